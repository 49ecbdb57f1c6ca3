"""The multimodal diagnosis model and its training loop. Imports no Flower, Gradio or Captum.

Kept import-light (no torch/timm/monai at package import): import the submodules you need.

    from multimodal.config import ModelConfig, TrainConfig
    from multimodal.model import build_model            # FedsightModel
    from multimodal.train import train_local            # the one training loop
    from multimodal.evaluate import evaluate, fit_model_temperature   # -> EvalReport
    from multimodal.checkpoint import save_checkpoint, load_checkpoint, load_into

Expert token counts for per-expert federated aggregation: `model.expert_counts()` ->
(n_blocks, n_experts), accumulated since `model.reset_expert_counts()` (train_local resets at its
start and returns them in TrainResult). GradCAM layers: `model.ct_encoder.feature_layer`,
`model.path_encoder.feature_layer`.
"""
