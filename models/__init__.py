"""Face models: detectors, embedders, alignment, training and evaluation.

This package never imports ``storage`` or ``pipeline``: it turns pixels into boxes and
vectors and nothing else. Configuration comes in through constructor arguments.
"""
