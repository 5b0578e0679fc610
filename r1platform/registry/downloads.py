"""A version's stored model file, downloaded by a member of its team."""

from __future__ import annotations

from pathlib import PurePath

from django.contrib.auth.decorators import login_required
from django.http import FileResponse, Http404

from r1platform.accounts.scoping import get_scoped_or_404, teams_for
from r1platform.core import storage
from r1platform.registry.models import ModelVersion


def download_name(version: ModelVersion) -> str:
    """``<model>-v<number><suffix>``: the model's name (one safe rule) and the stored suffix."""
    suffixes = "".join(PurePath(version.file).suffixes[-2:])
    return f"{version.model.name}-v{version.number}{suffixes}"


@login_required
def version_download(request, pk: int) -> FileResponse:
    qs = ModelVersion.objects.select_related("model")
    version = get_scoped_or_404(qs, teams_for(request.user), pk=pk)
    try:
        path = storage.media_path(version.file)
    except ValueError:
        raise Http404("this version has no stored file") from None
    if not path.is_file():
        raise Http404("this version's file is not in storage")
    # Streamed in blocks by the server; never read into memory here.
    return FileResponse(path.open("rb"), as_attachment=True, filename=download_name(version))
