"""Choosing k: measuring each MLP dense, allocating k per MLP under a
budget, running a model at other k."""

import keras
import numpy as np
import pytest

from tests.backend import numpy
from topk_sparse import allocation, ops, scoring, sparsity
from topk_sparse.layers import SparseMLP
from topk_sparse.models import T5, ViT


def vit(k=None, seed=0):
    keras.utils.set_random_seed(seed)
    model = ViT("micro", image_size=16, num_classes=10, k=k,
                method="exact")
    model(np.zeros((1, 16, 16, 3), "float32"))
    return model


def images(count, seed):
    return np.random.default_rng(seed).normal(
        size=(count, 16, 16, 3)).astype("float32")


def dense_reference(model, batches):
    """Per MLP, numpy `(activations [tokens, n], output kernel)` of the
    model run dense: a `k=None` twin with the same weights."""
    twin = ViT.from_config({**model.get_config(), "k": None})
    twin(batches[0][:1])
    twin.set_weights(model.get_weights())
    mlps = twin.sparse_mlps()
    with scoring.recording_inputs(mlps) as records:
        for batch in batches:
            twin(batch)
    reference = {}
    for name, mlp in mlps.items():
        x = np.concatenate(records[name]).astype(np.float64)
        hidden = x @ numpy(mlp.intermediate_kernel) + numpy(
            mlp.intermediate_bias)
        reference[name] = (np.maximum(hidden, 0),
                           numpy(mlp.output_kernel).astype(np.float64))
    return reference


def numpy_curve(activations, kernel, k):
    """Mean cosine and energy share of the top-k output, by sorting."""
    order = np.argsort(-activations, axis=-1, kind="stable")[:, :k]
    kept = np.zeros_like(activations)
    np.put_along_axis(kept, order, np.take_along_axis(activations, order, -1),
                      -1)
    dense, top = activations @ kernel, kept @ kernel
    cosine = np.sum(dense * top, -1) / (np.linalg.norm(dense, axis=-1) *
                                        np.linalg.norm(top, axis=-1))
    share = 1 - np.sum((top - dense) ** 2, -1) / np.sum(dense ** 2, -1)
    return cosine.mean(), share.mean()


def test_measure_matches_numpy_and_changes_nothing(monkeypatch):
    monkeypatch.setattr(allocation, "CHUNK", 50)  # 3 calls, the last short
    model = vit(k=[8, 16])
    batches = [images(4, 1), images(3, 2)]
    before = numpy(model(batches[0]))
    counts = [v.numpy() for v in sparsity.metric_state(model)]

    profiles = allocation.measure(model, batches)

    for variable, value in zip(sparsity.metric_state(model), counts):
        np.testing.assert_array_equal(variable.numpy(), value)
    np.testing.assert_array_equal(numpy(model(batches[0])), before)
    assert {n: m.k for n, m in model.sparse_mlps().items()} == {
        "encoder_block_0_mlp": 8, "encoder_block_1_mlp": 16}
    assert list(profiles) == list(model.sparse_mlps())
    reference = dense_reference(model, batches)
    for name, profile in profiles.items():
        activations, kernel = reference[name]
        assert profile.tokens == 7 * 17 and profile.mlp_dim == 128
        # Dense: more than the model's own k are active.
        np.testing.assert_array_equal(profile.active,
                                      np.sum(activations > 0, -1))
        assert profile.active.max() > 16
        for k in (1, 5, 16):
            np.testing.assert_allclose(profile.curve(k),
                                       numpy_curve(activations, kernel, k),
                                       rtol=1e-4)
        assert profile.curve(128) == (1.0, 1.0)


@pytest.mark.parametrize("k", [1, 3, 8, 64, 128])
def test_the_curve_keeps_what_exact_top_k_keeps_ties_included(k):
    # Few distinct values: many ties at each token's k-th largest.
    x = np.random.default_rng(k).integers(0, 5, (40, 128)).astype("float32")
    kept = allocation._kept(keras.ops.convert_to_tensor(x),
                            keras.ops.convert_to_tensor(k, "int32"))
    np.testing.assert_array_equal(numpy(kept),
                                  numpy(ops.topk_mask(x, k, "exact")))


def test_needed_k_is_the_least_k_that_reaches_the_target():
    profile = allocation.measure(vit(), [images(8, 3)])["encoder_block_1_mlp"]
    for target in (0.9, 0.99):
        k = profile.needed_k(cosine=target)
        assert profile.curve(k)[0] >= target > profile.curve(k - 1)[0]
    both = profile.needed_k(cosine=0.9, share=0.99)
    assert profile.curve(both)[1] >= 0.99 > profile.curve(both - 1)[1]
    summary = profile.summary(ks=[4, 128])
    assert summary["active_p50"] <= summary["active_p99"] <= \
        summary["active_max"] == profile.active.max()
    assert summary["curve"]["128"] == {"cosine": 1.0, "share": 1.0}
    assert summary["needed_k"] == {"cosine>=0.99": profile.needed_k(
        cosine=0.99)}
    with pytest.raises(ValueError, match="needs a target"):
        profile.needed_k()


def test_allocation_spends_the_budget_where_the_output_needs_it():
    model = vit(seed=4)
    # Block 1's MLP barely reaches the output: its k should be cut first.
    block = model.sparse_mlps()["encoder_block_1_mlp"]
    block.output_kernel.assign(block.output_kernel * 0.02)
    calibration, held_out = [images(16, 5)], [images(16, 6)]

    chosen = allocation.allocate(model, calibration, mean_k=20, step=8)

    assert sum(chosen.k.values()) == 40 and chosen.mean_k == 20
    assert chosen.k["encoder_block_1_mlp"] < chosen.k["encoder_block_0_mlp"]
    assert [lowered for *_, lowered in chosen.history].count(
        "encoder_block_1_mlp") > 0
    assert chosen.history[-1][:2] == (20, chosen.distance)
    uniform = allocation.uniform(model, np.int64(20))
    assert uniform == {"encoder_block_0_mlp": 20, "encoder_block_1_mlp": 20}
    assert allocation.output_distance(model, held_out, chosen.k) < \
        0.7 * allocation.output_distance(model, held_out, uniform)
    np.testing.assert_allclose(
        allocation.output_distance(model, calibration, chosen.k),
        chosen.distance, rtol=1e-6)
    assert allocation.output_distance(model, held_out, None) == 0
    # By each MLP's own output: blind to the weak block's small reach.
    local = allocation.allocate(model, calibration, mean_k=20, step=8,
                                by="mlp")
    assert sum(local.k.values()) == 40
    assert allocation.output_distance(model, held_out, local.k) > \
        allocation.output_distance(model, held_out, chosen.k)


def test_allocation_of_a_topk_model_starts_at_its_own_k():
    model = vit(k=[24, 8], seed=7)
    chosen = allocation.allocate(model, [images(8, 8)], mean_k=12, step=4)
    assert sum(chosen.k.values()) == 24
    assert chosen.k["encoder_block_0_mlp"] <= 24
    assert chosen.k["encoder_block_1_mlp"] <= 8
    # A budget above what the model uses changes nothing.
    unchanged = allocation.allocate(model, [images(8, 8)], mean_k=100)
    assert unchanged.k == {"encoder_block_0_mlp": 24,
                           "encoder_block_1_mlp": 8}
    assert unchanged.distance == 0 and unchanged.history == ()
    # The default step (a 32nd of 128) is at most half a small budget.
    small = allocation.allocate(model, [images(8, 8)], mean_k=3)
    sums = [24 + 8] + [round(2 * mean) for mean, *_ in small.history]
    assert set(np.diff(sums)) == {-1} and sums[-1] == 6


def test_a_bytes_budget_counts_what_a_decoding_step_reads():
    model = vit(seed=3)
    mlps = model.sparse_mlps()
    row = 4 * mlps["encoder_block_0_mlp"].output_kernel.shape[1]  # float32
    dense = sum(numpy(weight).nbytes for mlp in mlps.values()
                for weight in (mlp.intermediate_kernel, mlp.intermediate_bias,
                               mlp.output_kernel, mlp.output_bias))
    assert allocation.decode_bytes(model, None) == dense
    assert allocation.decode_bytes(model, 128) == dense
    assert allocation.decode_bytes(model, [9, 5]) - allocation.decode_bytes(
        model, {"encoder_block_0_mlp": 8, "encoder_block_1_mlp": 5}) == row
    # One output width: the bytes budget is the mean-k budget.
    batches = [images(8, 4)]
    for mean_k, extra in [(20, 0), (20.5, row)]:
        by_bytes = allocation.allocate(
            model, batches, by="mlp",
            max_bytes=allocation.decode_bytes(model, 20) + extra)
        by_mean = allocation.allocate(model, batches, mean_k, by="mlp")
        assert (by_bytes.k, by_bytes.history) == (by_mean.k, by_mean.history)


class TwoWidths(keras.Model):
    """Two MLPs whose rows of the second kernel differ in bytes (4x)."""

    def __init__(self):
        super().__init__()
        self.narrow = SparseMLP(64, output_dim=8, method="exact")
        self.wide = SparseMLP(64, output_dim=32, method="exact")

    def call(self, x):
        return self.wide(self.narrow(x))

    def sparse_mlps(self):
        return {"narrow": self.narrow, "wide": self.wide}


def test_a_bytes_budget_prices_each_mlp_by_its_rows():
    keras.utils.set_random_seed(0)
    model = TwoWidths()
    batches = [np.random.default_rng(1).normal(size=(4, 16, 16)).astype(
        "float32")]
    model(batches[0])
    budget = allocation.decode_bytes(model, 16)
    for by in allocation.BY:
        chosen = allocation.allocate(model, batches, max_bytes=budget,
                                     step=4, by=by)
        spent = allocation.decode_bytes(model, chosen.k)
        # Within the budget, and short of it by less than the wide MLP's
        # row (32 floats): the last step lowers only what is over.
        assert budget - 4 * 32 < spent <= budget
        assert chosen.history and chosen.history[-1][2] in chosen.k


def test_k_applied_runs_other_k_and_gives_the_model_back():
    model = vit(k=16)
    model.compile()
    x = images(4, 9)
    own = model.predict(x, verbose=0)
    mlp = model.sparse_mlps()["encoder_block_0_mlp"]
    marker = object()
    mlp.scorer = marker
    with allocation.k_applied(model, {"encoder_block_0_mlp": 1,
                                      "encoder_block_1_mlp": None}):
        assert mlp.k == 1 and mlp.scorer is None
        other = model.predict(x, verbose=0)
    assert mlp.k == 16 and mlp.scorer is marker
    mlp.scorer = None
    assert not np.allclose(other, own)
    np.testing.assert_array_equal(model.predict(x, verbose=0), own)


def test_t5_allocates_over_encoder_and_decoder():
    keras.utils.set_random_seed(0)
    model = T5("tiny", vocab_size=50, k=None)
    rng = np.random.default_rng(0)
    batch = {"encoder_tokens": rng.integers(1, 50, (4, 8)),
             "decoder_tokens": rng.integers(1, 50, (4, 6))}
    for by in allocation.BY:
        chosen = allocation.allocate(model, [batch], mean_k=128, step=64,
                                     by=by)
        assert list(chosen.k) == list(model.sparse_mlps())
        assert sum(chosen.k.values()) == 128 * len(chosen.k)
        assert chosen.distance > 0


@pytest.mark.parametrize("call, match", [
    (lambda m: allocation.allocate(m, [images(2, 0)], mean_k=0),
     r"mean_k must be a number in \[1, 128\]"),
    (lambda m: allocation.uniform(m, 129), r"in \[1, 128\].*got 129"),
    (lambda m: allocation.uniform(m, True), r"in \[1, 128\].*got True"),
    (lambda m: allocation.allocate(m, [], mean_k=8), "got no batches"),
    (lambda m: allocation.allocate(m, [images(2, 0)]),
     "allocate takes one budget, mean_k=.*or max_bytes=.*got mean_k=None"),
    (lambda m: allocation.allocate(m, [images(2, 0)], 8, max_bytes=10 ** 6),
     "allocate takes one budget"),
    (lambda m: allocation.allocate(m, [images(2, 0)], max_bytes=100),
     r"max_bytes must be a number of bytes of at least \d+ \(every MLP at "
     r"k=1; dense reads \d+\), got 100"),
    (lambda m: allocation.allocate(m, [images(2, 0)], max_bytes=True),
     "max_bytes must be a number of bytes.*got True"),
    (lambda m: allocation.measure(m, []), "got no batches"),
    (lambda m: allocation.allocate(m, [images(2, 0)], 8, step=0),
     "step must be a positive int"),
    (lambda m: allocation.allocate(m, [images(2, 0)], 8, by="layer"),
     r"Unknown by='layer': choose one of \('model', 'mlp'\)"),
    (lambda m: allocation.k_applied(m, [8]).__enter__(),
     "k has 1 values for 2 MLPs.*encoder_block_0_mlp, encoder_block_1_mlp"),
    (lambda m: allocation.k_applied(m, [8, 200]).__enter__(),
     r"k=200 is larger than the dimension it selects from \(128\)"),
    (lambda m: allocation.measure(keras.Sequential([keras.Input((4,)),
                                                    keras.layers.Dense(2)]),
                                  [np.zeros((1, 4))]),
     "has no MLP to choose k for.*keras_hub.sparsify"),
])
def test_bad_arguments_say_what_to_do(call, match):
    model = vit()
    with pytest.raises(ValueError, match=match):
        call(model)
    assert {m.k for m in model.sparse_mlps().values()} == {None}
