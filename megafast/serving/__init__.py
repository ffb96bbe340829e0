"""OpenAI-compatible serving of a megafast checkpoint (``tools/serve.py``; needs ``megafast[serve]``).

- ``engine``: runs a batch on every rank (rank 0 broadcasts each batch to the others);
- ``scheduler``: collects waiting requests into batches (static batching) on a worker thread;
- ``protocol``: OpenAI's request and response shapes, and its error shape;
- ``app``: the FastAPI application (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
  ``/health``).

Only ``engine`` and ``scheduler`` import without the ``serve`` extra (FastAPI, uvicorn).
"""
