"""Top-k MLPs in keras-hub backbones: T5, ViT, Gemma, Gemma3, Gemma3n.

`sparsify(backbone, k)` returns a copy of a keras-hub backbone (same
weights) in which every MLP keeps, per token, its `k` largest activations
(one `k` for all, or one per MLP)
(*The Lazy Neuron Phenomenon*, arXiv 2210.06313), each MLP with its own
`NonzeroFraction` metric, `<MLP path>/nonzero_fraction` in `fit` logs.
`k=None` changes no output and only measures (the natural sparsity of a
ReLU model such as a pretrained T5 preset).

Why a copy of another class: keras-hub backbones take no Top-k argument
(ViT, Gemma and Gemma3 ignore `activation=`; T5's applies one activation
instance to every layer, so one metric for all), and an activation swapped
into a built backbone reloads from `.keras` as the original, silently,
since a backbone saves its constructor arguments, not its layers. The copy
is a registered subclass (`TopKT5Backbone`, ...) whose config carries
`topk={"k", "method", "recall_target"}` and whose constructor installs the
Top-k after building the base model: a `.keras` reload and `from_config`
rebuild it sparse.

Where Top-k applies, per model (`MODELS`):

- `T5Backbone`, one per `T5TransformerLayer` (encoder and decoder): on
  `input_projector`'s output, then its activation (relu); gated T5: that
  branch, before its product with `gate_projector`.
- `ViTBackbone`, one per `vit_layers.MLP`: on `dense_1`'s output, then
  gelu.
- `GemmaBackbone` / `Gemma3Backbone`, one per decoder block: on the gate,
  `gating_ffw`'s output, then the block's gelu and the product with
  `gating_ffw_2`.
- `Gemma3nBackbone`, one per `Gemma3nTextMLP`: on the gate, as `act_fn`'s
  input (`gate_proj`'s output), then `hidden_activation` and the product
  with `up_proj`.

Top-k is `topk_sparse.TopKActivation` with the model's own activation
after it (`activation=`): ReLU, keep the `k` largest, then the model's
activation on the result: a dropped entry is 0
after it (relu, gelu and their approximations map 0 to 0), a kept one is
`act(x)`. For gated MLPs (Gemma, Gemma3, Gemma3n) that is the gate's
activation before the elementwise product, where Gemma 3n puts its own
statistical top-k; with `k`, a gelu gate keeps positive entries only
(ReLU comes first). Gemma3n: with `k`, this Top-k replaces Gemma 3n's
Gaussian top-k (`activation_sparsity` set to 0 in those MLPs, as if
`activation_sparsity_pattern` were zeros); with `k=None` the Gaussian
top-k stays and is what the metric measures.

The metric counts the share of the MLP's activations that are positive
after its activation (for ReLU, the paper's nonzero fraction; for gelu
without Top-k, the share of positive pre-activations).

Importing this module imports keras-hub; `import topk_sparse` does not.
"""

import dataclasses
import re

import keras
from keras_hub.src.models.gemma.gemma_backbone import GemmaBackbone
from keras_hub.src.models.gemma.gemma_decoder_block import GemmaDecoderBlock
from keras_hub.src.models.gemma3.gemma3_backbone import Gemma3Backbone
from keras_hub.src.models.gemma3.gemma3_decoder_block import (
    Gemma3DecoderBlock)
from keras_hub.src.models.gemma3n.gemma3n_backbone import Gemma3nBackbone
from keras_hub.src.models.gemma3n.gemma3n_text_layers import Gemma3nTextMLP
from keras_hub.src.models.t5.t5_backbone import T5Backbone
from keras_hub.src.models.t5.t5_transformer_layer import T5TransformerLayer
from keras_hub.src.models.vit.vit_backbone import ViTBackbone
from keras_hub.src.models.vit.vit_layers import MLP as ViTMLP

from topk_sparse import ops as topk_ops
from topk_sparse.layers import TopKActivation
from topk_sparse.sparsity import NONZERO_SUFFIX
from topk_sparse.models.common import k_config, k_per_mlp

_PACKAGE = "topk_sparse"


@dataclasses.dataclass(frozen=True)
class ModelSite:
    """Where one keras-hub model's MLP activation lives.

    Attributes:
      mlp: the layer class of which each instance is one MLP (or the block
        holding it).
      host: `mlp -> (layer, attribute)`: the attribute that holds the
        activation, read at every call.
      activation: `mlp -> str or None`: the model's own activation there.
      mlp_dim: `mlp -> int`: the width Top-k selects from.
      where: the README's words for it.
    """
    mlp: type
    host: callable
    activation: callable
    mlp_dim: callable
    where: str


def _serialized(activation):
    return keras.activations.serialize(activation)


MODELS = {
    T5Backbone: ModelSite(
        mlp=T5TransformerLayer,
        host=lambda layer: (layer.input_projector, "activation"),
        activation=lambda layer: _serialized(
            layer.input_projector.activation),
        mlp_dim=lambda layer: layer.input_projector.units,
        where="T5TransformerLayer.input_projector's activation (encoder "
              "and decoder; gated T5: before the product with "
              "gate_projector)"),
    ViTBackbone: ModelSite(
        mlp=ViTMLP,
        host=lambda mlp: (mlp.dense_1, "activation"),
        activation=lambda mlp: _serialized(mlp.dense_1.activation),
        mlp_dim=lambda mlp: mlp.dense_1.units,
        where="vit_layers.MLP.dense_1's activation (gelu)"),
    GemmaBackbone: ModelSite(
        mlp=GemmaDecoderBlock,
        host=lambda block: (block.gating_ffw, "activation"),
        activation=lambda block: None,
        mlp_dim=lambda block: block.gating_ffw.kernel.shape[-1],
        where="GemmaDecoderBlock.gating_ffw's output (the gate, before "
              "the block's gelu and the product with gating_ffw_2)"),
    Gemma3Backbone: ModelSite(
        mlp=Gemma3DecoderBlock,
        host=lambda block: (block.gating_ffw, "activation"),
        activation=lambda block: None,
        mlp_dim=lambda block: block.gating_ffw.kernel.shape[-1],
        where="Gemma3DecoderBlock.gating_ffw's output (as Gemma)"),
    Gemma3nBackbone: ModelSite(
        mlp=Gemma3nTextMLP,
        host=lambda mlp: (mlp, "act_fn"),
        activation=lambda mlp: mlp.hidden_activation,
        mlp_dim=lambda mlp: mlp.intermediate_size,
        where="Gemma3nTextMLP.act_fn (the gate's activation, after its "
              "Gaussian top-k, before the product with up_proj)"),
}
"""The keras-hub backbones `sparsify` knows, and where their MLPs' Top-k
goes."""


def _in_depth_order(mlps):
    """`mlps` in layer order: by the numbers in their paths, within each
    path pattern (the path less its numbers: T5's encoder layers, then its
    decoder layers) in the order keras-hub tracks them. Tracking order
    alone is not depth order: Gemma3n's lists its last block first."""
    def pattern(mlp):
        return re.sub(r"\d+", "#", mlp.path)

    patterns = list(dict.fromkeys(pattern(mlp) for mlp in mlps))
    return sorted(mlps, key=lambda mlp: (
        patterns.index(pattern(mlp)),
        [int(number) for number in re.findall(r"\d+", mlp.path)]))


def _install(backbone, site, k, method, recall_target):
    """Puts a `TopKActivation` (with the MLP's own activation after it) in
    every MLP of `backbone`, with its `k` (`k_per_mlp` by MLP path);
    returns them."""
    mlps = _in_depth_order([
        layer for layer in backbone._flatten_layers(include_self=False)
        if isinstance(layer, site.mlp)])
    if not mlps:
        raise ValueError(
            f"No {site.mlp.__name__} found in {type(backbone).__name__} "
            f"{backbone.name!r}: keras-hub changed where the MLPs live.")
    installed = []
    for mlp, k in zip(mlps, k_per_mlp(
            k, {mlp.path: site.mlp_dim(mlp) for mlp in mlps}).values()):
        host, attribute = site.host(mlp)
        activation = TopKActivation(
            k, method, recall_target, activation=site.activation(mlp),
            metric_name=mlp.path + NONZERO_SUFFIX,
            dtype=host.dtype_policy,
            name=mlp.path.replace("/", "_") + "_topk")
        # Built here, outside any traced function, so that its metric
        # exists before `fit` compiles a step.
        activation.build((None, site.mlp_dim(mlp)))
        # Keras locks a built layer's tracked state, and the host is built:
        # the attribute is set without tracking (the host reads it at every
        # call), and the backbone tracks the layers (`topk_activations`).
        object.__setattr__(host, attribute, activation)
        if k is not None and isinstance(mlp, Gemma3nTextMLP):
            mlp.activation_sparsity = 0.0  # Top-k replaces Gemma 3n's own
        installed.append(activation)
    return installed


def _topk_backbone_class(base):
    """The registered subclass of `base` that installs Top-k MLPs."""

    class TopKBackbone(base):
        def __init__(self, *args, topk=None, **kwargs):
            super().__init__(*args, **kwargs)
            topk = dict(topk or {})
            self._topk_config = {
                "k": topk.get("k"), "method": topk.get("method", "auto"),
                "recall_target": topk.get("recall_target", 0.95)}
            self.topk_activations = _install(self, MODELS[base],
                                             **self._topk_config)

        def get_config(self):
            return {**super().get_config(),
                    "topk": dict(self._topk_config)}

        def sparse_mlps(self):
            """Each MLP's `TopKActivation` by MLP path, in depth order (as
            `topk_sparse.models.ViT.sparse_mlps`): the names `sparsify`'s
            `k` mapping and `topk_sparse.allocation` use."""
            return {layer.metric_name.removesuffix(NONZERO_SUFFIX): layer
                    for layer in self.topk_activations}

    TopKBackbone.__name__ = TopKBackbone.__qualname__ = (
        f"TopK{base.__name__}")
    TopKBackbone.__doc__ = (
        f"`{base.__name__}` with Top-k MLPs (`sparsify`); extra argument "
        "`topk={'k', 'method', 'recall_target'}`; `sparse_mlps()`.")
    TopKBackbone.__module__ = __name__
    return keras.saving.register_keras_serializable(package=_PACKAGE)(
        TopKBackbone)


TOPK_BACKBONES = {base: _topk_backbone_class(base) for base in MODELS}
TopKT5Backbone = TOPK_BACKBONES[T5Backbone]
TopKViTBackbone = TOPK_BACKBONES[ViTBackbone]
TopKGemmaBackbone = TOPK_BACKBONES[GemmaBackbone]
TopKGemma3Backbone = TOPK_BACKBONES[Gemma3Backbone]
TopKGemma3nBackbone = TOPK_BACKBONES[Gemma3nBackbone]


def sparsify(backbone, k, method="auto", recall_target=0.95):
    """A copy of a keras-hub backbone with Top-k MLPs, same weights.

    Args:
      backbone: a `T5Backbone`, `ViTBackbone`, `GemmaBackbone`,
        `Gemma3Backbone` or `Gemma3nBackbone` (built, e.g. `from_preset`),
        or one that `sparsify` returned (its Top-k is replaced).
      k: int or None: activations kept per token in every MLP, at most the
        MLP's width; None: no Top-k, each MLP only measures its nonzero
        fraction. Or one per MLP: a list in layer order, or a mapping by
        MLP path (the paths of its metrics' names, `<MLP path>/
        nonzero_fraction`; `topk_sparse.allocation.allocate` gives one).
      method: str. One of `topk_sparse.ops.METHOD_NAMES`. Defaults to "auto".
      recall_target: float in (0, 1]. Expected recall of `"approx"`.
        Defaults to 0.95.

    Returns:
      A `TopK<Backbone>`: a subclass of the backbone's class, built from its
      config plus `topk`, holding copies of its weights. Its MLPs'
      activations are `backbone.topk_activations`, each with
      `.nonzero_fraction`; `fit` logs them as `<MLP path>/nonzero_fraction`.

    Raises:
      ValueError: for another backbone class (naming the known ones), `k`
        larger than an MLP's width, or a `k` list of another length or
        mapping of other names than the MLPs' (naming them).

    Example:
        backbone = keras_hub.models.T5Backbone.from_preset("t5_base_multi")
        measured = sparsify(backbone, k=None)   # natural sparsity
        topk = sparsify(backbone, k=128)        # the paper's Top-128 T5
        chosen = topk_sparse.allocation.allocate(measured, batches, 128)
        allocated = sparsify(backbone, k=chosen.k)  # one k per MLP
    """
    base = type(backbone)
    for plain, topk_class in TOPK_BACKBONES.items():
        if base is topk_class:
            base = plain
    if base not in MODELS:
        known = ", ".join(cls.__name__ for cls in MODELS)
        raise ValueError(
            f"sparsify does not know {base.__name__}: it knows {known} "
            "(topk_sparse.integrations.keras_hub.MODELS says where each "
            "one's MLP activation lives).")
    config = backbone.get_config()
    config["topk"] = {"k": k_config(k),  # checked as the MLPs are found
                      "method": topk_ops.validate_method(method),
                      "recall_target": topk_ops.validate_recall_target(
                          recall_target)}
    sparse = TOPK_BACKBONES[base].from_config(config)
    sparse.set_weights(backbone.get_weights())
    return sparse
