"""The DVC stages, one module each: each wires the modules together and writes its outputs.

A stage takes the loaded ``Params`` and reads only the sections that dvc.yaml lists for it.
``STAGES`` is their order; this module imports nothing, so the entry point (``__main__``) and
the flow (``flows``) can both read it without importing each other.
"""

STAGES = ("prepare", "train_classifier", "train", "generate", "evaluate", "register", "ood", "restore")
