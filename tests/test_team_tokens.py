"""API tokens from the dashboard: made (shown once), named, listed and revoked by their owner."""

from __future__ import annotations

import re

from django.test import Client
from django.urls import reverse

from r1platform.accounts.models import ApiToken, Membership, hash_token


def create(client, team, name="ci uploads"):
    return client.post(reverse("accounts:tokens"), {"name": name, "team": team.pk})


def test_a_member_makes_a_token_that_the_api_accepts_and_sees_it_once(member_client, team):
    response = create(member_client, team)
    assert response.status_code == 201
    assert response["Cache-Control"] == "no-store"
    raw = re.search(r'data-testid="new-token-value">(r1_[^<]+)<', response.content.decode())[1]
    token = ApiToken.objects.get()
    assert token.token_hash == hash_token(raw) and token.name == "ci uploads"

    api = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert api.get("/api/v1/models").status_code == 200

    page = member_client.get(reverse("accounts:tokens")).content.decode()
    assert raw not in page  # shown once
    assert 'data-state="active"' in page and token.prefix in page and "ci uploads" in page


def test_revoking_stops_the_token_at_once(member_client, team):
    raw = re.search(r">(r1_[^<]+)<", create(member_client, team).content.decode())[1]
    token = ApiToken.objects.get()
    answer = member_client.post(reverse("accounts:revoke", args=[token.pk]))
    assert answer.status_code == 302
    assert Client(HTTP_AUTHORIZATION=f"Bearer {raw}").get("/api/v1/models").status_code == 401
    page = member_client.get(reverse("accounts:tokens")).content.decode()
    assert 'data-state="revoked"' in page and "revoked" in page


def test_only_ones_own_teams_and_tokens(member_client, team, other_team, outsider):
    refused = create(member_client, other_team)
    assert refused.status_code == 200 and not ApiToken.objects.exists()
    assert "Select a valid choice" in refused.content.decode()

    theirs, _ = ApiToken.issue(outsider, other_team, name="theirs")
    assert member_client.post(reverse("accounts:revoke", args=[theirs.pk])).status_code == 404
    theirs.refresh_from_db()
    assert theirs.revoked_at is None
    assert "theirs" not in member_client.get(reverse("accounts:tokens")).content.decode()


def test_a_token_of_a_team_left_shows_as_not_usable(member_client, team, user):
    create(member_client, team)
    Membership.objects.filter(user=user, team=team).delete()
    page = member_client.get(reverse("accounts:tokens")).content.decode()
    assert 'data-state="revoked"' in page


def test_the_api_docs_say_how_to_authorize(client, db):
    doc = client.get("/api/v1/openapi.json").json()
    assert "/teams/tokens/" in doc["info"]["description"]
    assert doc["components"]["securitySchemes"]["TeamToken"]["scheme"] == "bearer"
