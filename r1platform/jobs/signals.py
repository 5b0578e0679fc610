"""What a job announces, for the apps above ``jobs`` to act on without ``jobs`` knowing them.

``jobs`` sits below certification and schedules, so it cannot call them; they connect receivers
to these signals in their ``AppConfig.ready`` instead. Both are sent on the worker that ran the
job, through ``jobs.services``.
"""

from __future__ import annotations

from django.dispatch import Signal

# Sent by ``finish_job`` once the job's end is saved; kwargs: ``job``. Receivers are called in
# INSTALLED_APPS order (certification before schedules) and an error in one is logged, never
# raised: the job's own outcome is already recorded.
job_finished = Signal()

# Sent by ``report_certification`` when a certify stage hands over its suite report; kwargs:
# ``job``, ``version`` (the ModelVersion certified), ``report`` (a SuiteReport as a dict). A
# receiver returns what it recorded; an error fails the job, as a stage's would.
certification_reported = Signal()
