"""The wire protocol of cnisup: envelopes, event kinds, the JSON Schema, and a
subscriber helper with sequence-gap detection.

This package is the lowest layer: it imports nothing else of cnisup, so any
program (or another language, via ``schema/envelope.schema.json``) can depend on
it alone.
"""
