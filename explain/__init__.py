"""Explanations: Captum attributions over CT, pathology and EHR, modality contributions, answers.
Imports no Gradio."""
