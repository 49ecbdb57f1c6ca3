"""Synthetic federation generator: hospitals written as real DICOM / PNG / CSV site data roots.

Entry points: `synth.config.SynthConfig`, `synth.federation.generate`, `synth.truth.load_truth`.
Imports vocab, numpy, pydicom and pillow only; runtime packages never import it.
"""
