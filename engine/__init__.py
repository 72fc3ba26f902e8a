"""scdino.engine: plates -> cells -> crops -> embeddings (``scdino-engine``).

Public API: :func:`scdino.engine.pipeline.run` with :class:`scdino.engine.pipeline.RunConfig`.
Submodules are imported on use so that the command line starts fast.
"""
