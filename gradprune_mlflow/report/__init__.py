"""What a reviewer reads about one sanitize run: the figures (figures), the self-contained HTML page (html), the
before/after table and the texts built on it (summary), and logging them to the MLflow run (review).
"""
