"""pacs-agent: an AI plugin service beside a hospital PACS.

This package is the service side: listener, scheduler, database, DICOM result builders, CLI.
It never imports torch, MONAI or ``workers`` (DESIGN invariant 4; enforced by ruff's
banned-api rule and by a test).
"""

__version__ = "0.1.0"
