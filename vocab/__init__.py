"""Shared vocabulary (stdlib only): modality names, EHR schemas, record keys, typed errors.

Sits below every other fedsight package so that the hospital node, the coordinator, the model,
the explanations and the UI name things the same way without importing each other.
"""
