"""The OpenAI Batch API on Slurm: /v1/files and /v1/batches behind the pool's frontend, each batch
a Slurm job (objects.py: the API's shapes and rules, pure; store.py: SQLite and the files;
service.py: the HTTP service and its process; runner.py: the job)."""
