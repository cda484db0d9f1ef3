"""The worker side of pacs-agent: the Celery app, thin tasks and the inference runtime.

Only this package imports torch and MONAI, and only inside the inference runtime, which the
tasks import lazily: an io worker never loads torch.
"""
