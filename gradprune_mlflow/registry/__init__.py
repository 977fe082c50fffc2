"""The MLflow Model Registry side: which versions are pending (pending), claiming them (claim), loading them safely
(source), the inputs their tags name (inputs), logging the run (log), registering the result (register), the steps
of one version put together (job) and the registry contract: statuses, tags and alias (tags).

What reviewers read (report.html, figures, descriptions) is built in gradprune_mlflow.report. Nothing here imports
Prefect: gradprune_flows composes these functions into tasks.
"""
