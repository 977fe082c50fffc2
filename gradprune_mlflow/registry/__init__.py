"""The MLflow side: which versions are pending (pending), claiming them (claim), loading them safely (source), the
inputs their tags name (inputs), logging the run (log), registering the result (register), the steps of one version
put together (job), the registry contract (tags), and local services for the demo and tests (services).

Nothing here imports Prefect: flows/ composes these functions into tasks.
"""
