"""What the dashboard's certification tables show: a model's compatibility matrix, a version's
certifications. Validity needs each version's file hash, which storage caches by size and mtime.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.certification.report import level_at_least
from r1platform.certification.models import Certification
from r1platform.certification.services import Validity, validity
from r1platform.registry.models import ModelVersion, RegisteredModel
from r1platform.workers.models import HardwareProfile
from r1platform.workers.services import live_profiles


@dataclass(frozen=True)
class CertRow:
    cert: Certification
    validity: Validity

    @property
    def state(self) -> str:
        return self.validity.state


def rows(certs) -> list[CertRow]:
    return [CertRow(c, validity(c)) for c in certs]


def best(cert_rows: list[CertRow]) -> CertRow | None:
    """The row a cell shows: the highest valid certificate, else the newest certification."""
    valid = [r for r in cert_rows if r.validity.valid]
    if valid:
        top = valid[0]
        for r in valid[1:]:
            if not level_at_least(top.cert.level, r.cert.level):
                top = r
        return top
    return cert_rows[0] if cert_rows else None


def _certs():
    return Certification.objects.select_related("profile", "version__model", "job")


def version_certifications(version: ModelVersion) -> list[CertRow]:
    """Every certification of one version, grouped by profile, newest first in each."""
    certs = _certs().filter(version=version).order_by("profile__key", "-created_at", "-pk")
    return rows(certs)


@dataclass(frozen=True)
class Matrix:
    profiles: list[HardwareProfile]
    served: set[int]
    # One row per version, newest first: (version, [cell per profile, None where none]).
    rows: list[tuple[ModelVersion, list[CertRow | None]]]


def compatibility_matrix(model: RegisteredModel) -> Matrix:
    """Versions × profiles: each cell the version's best certification on that profile.

    The columns are the profiles any version was certified on, and those served now.
    """
    versions = list(
        model.versions.order_by("-number").only("pk", "number", "format", "precision", "backend")
    )
    certs = list(_certs().filter(version__model=model).order_by("-created_at", "-pk"))
    served = set(live_profiles().values_list("pk", flat=True))
    profile_ids = {c.profile_id for c in certs} | served
    profiles = list(HardwareProfile.objects.filter(pk__in=profile_ids))
    by_cell: dict[tuple[int, int], list[Certification]] = {}
    for c in certs:
        by_cell.setdefault((c.version_id, c.profile_id), []).append(c)
    table = [(v, [best(rows(by_cell.get((v.pk, p.pk), []))) for p in profiles]) for v in versions]
    return Matrix(profiles, served, table)
