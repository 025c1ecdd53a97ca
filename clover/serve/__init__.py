"""``python -m clover.serve``: an OpenAI-compatible HTTP server for a base model with its Clover-2 or EAGLE-1 draft.

Needs the ``serve`` extra (``pip install -e .[serve]``: FastAPI and uvicorn). Modules: :mod:`~clover.serve.schema`
(request validation, OpenAI's error format), :mod:`~clover.serve.engine` (the model, its worker thread and queue),
:mod:`~clover.serve.app` (the routes), ``__main__`` (the command line).
"""
