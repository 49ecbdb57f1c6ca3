"""The clinician web app (Gradio), built by a factory from a diagnosis service; no model logic."""
