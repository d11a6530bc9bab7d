"""Top-k MLPs in models built with other libraries.

- `topk_sparse.integrations.model_garden`: TensorFlow Model Garden
  (`tf-models-official`, tf_keras): an `inner_activation` for its encoder
  blocks, a `TransformerScaffold` feedforward, a Top-k vision ViT.
- `topk_sparse.integrations.keras_hub`: keras-hub backbones (Keras 3):
  `sparsify(backbone, k)` for T5, ViT, Gemma, Gemma3 and Gemma3n.

Nothing is imported here: each module imports its library (tf_keras and
Model Garden, or keras-hub) when it is itself imported, so `import
topk_sparse` needs neither. Install lines: README.md, "Integrations".
"""
