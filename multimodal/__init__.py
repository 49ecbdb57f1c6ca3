"""The multimodal diagnosis model and its training loop. Imports no Flower, Gradio or Captum."""
