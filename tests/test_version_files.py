"""A version's model file downloads for its team, byte for byte, and for no one else."""

from __future__ import annotations

import hashlib

from django.urls import reverse


def test_a_member_downloads_the_stored_file_with_a_safe_name(member_client, version, mlp_onnx):
    page = member_client.get(version.get_absolute_url()).content.decode()
    url = reverse("registry:version_download", args=[version.pk])
    assert f'href="{url}"' in page

    response = member_client.get(url)
    assert response.status_code == 200
    body = b"".join(response.streaming_content)
    assert hashlib.sha256(body).hexdigest() == version.sha256
    assert body == mlp_onnx.read_bytes()
    assert response["Content-Disposition"] == 'attachment; filename="mlp-v1.onnx"'


def test_another_team_and_anonymous_get_nothing(client, version, outsider):
    url = reverse("registry:version_download", args=[version.pk])
    assert client.get(url).status_code == 302  # to the login page
    client.force_login(outsider)
    assert client.get(url).status_code == 404


def test_a_missing_file_is_a_404_not_a_500(member_client, version, media):
    (media / version.file).unlink()
    url = reverse("registry:version_download", args=[version.pk])
    assert member_client.get(url).status_code == 404


def test_the_favicon_is_linked_and_answers_at_the_browsers_default_path(member_client, media):
    page = member_client.get("/").content.decode()
    assert 'rel="icon" href="/static/r1/favicon.svg"' in page
    answer = member_client.get("/favicon.ico")
    assert answer.status_code == 301 and answer["Location"] == "/static/r1/favicon.svg"
