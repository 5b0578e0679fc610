"""Test settings: the project's own, with every path under a fresh temporary R1_HOME.

The SQLite test database is a file (not in memory) so that a real worker process started by a
test reads and writes the same database as the test.
"""

import atexit
import os
import shutil
import tempfile

if "R1_HOME" not in os.environ:
    os.environ["R1_HOME"] = tempfile.mkdtemp(prefix="r1-test-")
    atexit.register(shutil.rmtree, os.environ["R1_HOME"], True)

from r1platform.settings import *  # noqa: E402,F403
from r1platform.settings import DATABASES, R1_HOME  # noqa: E402

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["TEST"] = {"NAME": str(R1_HOME / "test.sqlite3")}

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
R1_HEARTBEAT_SECONDS = 1
R1_HEARTBEAT_STALE = 4
R1_WORKER_BEAT_SECONDS = 1
R1_WORKER_LOST_SECONDS = 5
R1_SERVING_STATS_SECONDS = 1
R1_WEBHOOK_BACKOFF_SECONDS = 1
