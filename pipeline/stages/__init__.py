"""The DVC stages, one module each: each wires the modules together and writes its outputs.

A stage takes the loaded ``Params`` and reads only the sections that dvc.yaml lists for it.
"""
