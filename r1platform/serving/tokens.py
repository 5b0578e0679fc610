"""Which team an API token calls for, in the serving process, with no query per request.

A thread of its own reads the usable tokens (``ApiToken.objects.usable()``: not revoked, of an
active user still in the token's team) every ``every`` seconds into a :class:`TokenCache`, apart
from the model poller, so a model that takes minutes to load does not hold the tokens back. A
member removed or a user deactivated is refused by the next read, about a second later.

When the tokens cannot be read (the database is down), the last list is used for ``max_age``
seconds; after that every token is refused (503) rather than trusting a list that may hold
revoked tokens.

The dashboard's playground (``serving.playground``) calls the serving process without a team
token: it signs a short-lived one (:func:`sign_playground_token`: ``django.core.signing`` with
the salt ``r1-playground`` and the platform's ``SECRET_KEY``, which the serving process shares,
carrying the team and user ids) after checking the user is a member of the model's team. A
signed token calls for its team, like that team's API token, for ``PLAYGROUND_MAX_AGE_SECONDS``
after it was signed; a forged or expired one is refused (401). It never leaves the web process
(the browser talks to the dashboard only), and it needs no database read, so it is checked before
the token list.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from django.core import signing

from r1platform.accounts.models import hash_token
from r1platform.serving.source import ModelSource

log = logging.getLogger(__name__)

# The longest the serving process trusts tokens it could not read again.
DEFAULT_MAX_AGE_SECONDS = 30.0
# How long starting the app waits for the first read, so the first requests are not refused.
FIRST_READ_WAIT_SECONDS = 10.0

# The dashboard's signed playground tokens (see the module's docstring).
PLAYGROUND_PREFIX = "r1pg."  # team API tokens start "r1_": the two never look alike
PLAYGROUND_SALT = "r1-playground"
PLAYGROUND_MAX_AGE_SECONDS = 120


def sign_playground_token(team_id: int, user_id: int) -> str:
    """A token the serving process takes for ``team_id`` for ``PLAYGROUND_MAX_AGE_SECONDS``."""
    payload = {"team": team_id, "user": user_id}
    return PLAYGROUND_PREFIX + signing.dumps(payload, salt=PLAYGROUND_SALT)


def playground_team(raw_token: str, max_age: float = PLAYGROUND_MAX_AGE_SECONDS) -> int | None:
    """The team of a signed playground token; None when it is not one, forged, or expired."""
    if not raw_token.startswith(PLAYGROUND_PREFIX):
        return None
    try:
        payload = signing.loads(
            raw_token[len(PLAYGROUND_PREFIX) :], salt=PLAYGROUND_SALT, max_age=max_age
        )
    except signing.BadSignature:  # SignatureExpired included
        return None
    team = payload.get("team") if isinstance(payload, dict) else None
    return team if isinstance(team, int) and not isinstance(team, bool) else None


class TokensUnavailable(Exception):
    """The tokens are too old to trust (or not read yet): answer 503, not 401."""


class TokenCache:
    """sha256 of every usable token -> its team, and when that was read; replaced whole."""

    def __init__(
        self,
        max_age: float = DEFAULT_MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_age = max_age
        self._clock = clock
        # One tuple, swapped in one assignment: a reader never sees a list with another's time.
        self._state: tuple[dict[str, int], float | None] = ({}, None)

    def replace(self, teams: Mapping[str, int]) -> None:
        self._state = (dict(teams), self._clock())

    def age(self) -> float | None:
        read_at = self._state[1]
        return None if read_at is None else self._clock() - read_at

    def team_for(self, raw_token: str) -> int | None:
        """The token's team, None for a token that may not call; TokensUnavailable when the
        list is too old to tell. A signed playground token is checked by its signature alone."""
        if raw_token.startswith(PLAYGROUND_PREFIX):
            return playground_team(raw_token)
        teams, read_at = self._state
        if read_at is None:
            raise TokensUnavailable("the API tokens have not been read yet; try again shortly")
        age = self._clock() - read_at
        if age > self.max_age:
            raise TokensUnavailable(
                f"the API tokens could not be checked for {age:.0f} s (the platform's database "
                "is unreachable from this serving process); try again later"
            )
        return teams.get(hash_token(raw_token))


class TokenRefresher:
    """The thread that reads ``source.token_teams()`` into ``cache`` every ``every`` seconds."""

    def __init__(self, source: ModelSource, cache: TokenCache, every: float) -> None:
        self.source, self.cache, self.every = source, cache, every
        self._stop = threading.Event()
        self._first_read = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, wait: float = FIRST_READ_WAIT_SECONDS) -> None:
        self._thread = threading.Thread(target=self._run, name="serving tokens", daemon=True)
        self._thread.start()
        self._first_read.wait(wait)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        failing = False
        try:
            while not self._stop.is_set():
                try:
                    self.cache.replace(self.source.token_teams())
                    if failing:
                        log.warning("serving: API tokens read again")
                    failing = False
                except Exception:
                    if not failing:  # once per outage, not every second
                        log.exception(
                            "serving: cannot read the API tokens; the last ones are used for "
                            "%.0f s, then every request is refused",
                            self.cache.max_age,
                        )
                    failing = True
                self._first_read.set()
                self._stop.wait(self.every)
        finally:
            self.source.close()
