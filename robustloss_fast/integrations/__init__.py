"""Integrations with other libraries, each imported on its own.

``robustloss_fast.integrations.transformers`` patches Hugging Face
``transformers`` models (and gives a ``Trainer`` loss); it is not imported by
``import robustloss_fast`` and does not itself import ``transformers``.
"""
