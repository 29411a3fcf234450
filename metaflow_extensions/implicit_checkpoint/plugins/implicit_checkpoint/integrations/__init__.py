"""Framework integrations: save through ``current.checkpoint`` at a framework's own save points
and resume its trainer from what ``load()`` restores.

``hf.py`` (Hugging Face ``Trainer``, extra ``[hf]``) and ``lightning.py`` (Lightning ``Trainer``,
extra ``[lightning]``). Each imports its framework; the rest of the package imports neither.
"""
