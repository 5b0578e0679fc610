"""Pools and policies are edited here; deployments change only through ``services`` (the gate).

The deployment admin is read-only: no add, change or delete. Its Promote page and its
Roll back action call ``services.promote`` and ``services.rollback``, so a superuser goes
through the same gate, approval policy and audit log as everyone else.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse

from r1platform.deployments import services
from r1platform.deployments.models import (
    AuditEvent,
    Deployment,
    PromotionPolicy,
    PromotionRequest,
    ServingPool,
    Stage,
)
from r1platform.registry.models import ModelVersion

ADMIN_LABEL = "admin"
# Who may promote and roll back from the admin (through the gate): the change permission, which
# no form here uses to edit a row directly.
PROMOTE_PERMISSION = "deployments.change_deployment"


@admin.register(ServingPool)
class ServingPoolAdmin(admin.ModelAdmin):
    list_display = ["name", "profile", "max_batch_size", "max_queue_delay_ms", "created_at"]
    list_select_related = ["profile"]
    search_fields = ["name", "profile__key"]
    raw_id_fields = ["profile"]


@admin.register(PromotionPolicy)
class PromotionPolicyAdmin(admin.ModelAdmin):
    list_display = ["team", "required_level", "require_approval"]
    list_filter = ["required_level", "require_approval"]
    list_select_related = ["team"]
    raw_id_fields = ["team"]


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows written only by the services: the admin may look, never add, edit or delete."""

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class AdminPromoteForm(forms.Form):
    version = forms.IntegerField(label="Version id", help_text="the ModelVersion's id")
    pool = forms.ModelChoiceField(queryset=ServingPool.objects.select_related("profile"))
    stage = forms.ChoiceField(choices=Stage.choices)
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}))

    def clean_version(self) -> ModelVersion:
        found = ModelVersion.objects.select_related("model__team").filter(
            pk=self.cleaned_data["version"]
        )
        if not found:
            raise forms.ValidationError("no version with this id")
        return found[0]


def _report(modeladmin, request, outcome: services.PromotionOutcome) -> None:
    level = messages.ERROR if outcome.refused else messages.SUCCESS
    modeladmin.message_user(request, f"{outcome.status}: {outcome.reason}", level)


@admin.register(Deployment)
class DeploymentAdmin(ReadOnlyAdmin):
    list_display = ["model", "pool", "stage", "version", "previous_version", "generation"]
    list_display += ["updated_at", "updated_by"]
    list_filter = ["stage", "pool"]
    list_select_related = ["model", "pool", "version__model", "previous_version__model"]
    list_select_related += ["updated_by"]
    search_fields = ["model__name"]
    actions = ["roll_back"]
    change_list_template = "admin/deployments/deployment/change_list.html"

    def get_urls(self):
        promote = self.admin_site.admin_view(self.promote_view)
        return [
            path("promote/", promote, name="deployments_deployment_promote"),
            *super().get_urls(),
        ]

    def promote_view(self, request):
        if not self.has_roll_back_permission(request):
            raise PermissionDenied
        form = AdminPromoteForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            version = form.cleaned_data["version"]
            outcome = services.promote(
                model=version.model,
                version=version,
                pool=form.cleaned_data["pool"],
                stage=form.cleaned_data["stage"],
                actor=request.user,
                actor_label=ADMIN_LABEL,
                reason=form.cleaned_data["reason"],
            )
            _report(self, request, outcome)
            if not outcome.refused:
                return redirect(reverse("admin:deployments_deployment_changelist"))
        context = {
            **self.admin_site.each_context(request),
            "title": "Promote a version (through the certification gate)",
            "form": form,
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/deployments/deployment/promote.html", context)

    @admin.action(
        description="Roll back the selected deployments to their previous version",
        permissions=["roll_back"],
    )
    def roll_back(self, request, queryset) -> None:
        for deployment in queryset.select_related("model", "pool"):
            outcome = services.rollback(
                model=deployment.model,
                pool=deployment.pool,
                stage=deployment.stage,
                actor=request.user,
                actor_label=ADMIN_LABEL,
                reason="rolled back from the admin",
            )
            _report(self, request, outcome)

    def has_roll_back_permission(self, request) -> bool:
        return request.user.has_perm(PROMOTE_PERMISSION)


@admin.register(PromotionRequest)
class PromotionRequestAdmin(ReadOnlyAdmin):
    list_display = ["id", "model", "pool", "stage", "version", "status", "requested_by"]
    list_display += ["decided_by", "created_at"]
    list_filter = ["status", "stage"]
    list_select_related = ["model", "pool", "version__model", "requested_by", "decided_by"]


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "action", "model", "pool", "stage", "version", "actor"]
    list_display += ["actor_label", "reason"]
    list_filter = ["action", "stage"]
    list_select_related = ["model", "pool", "version__model", "actor"]
    search_fields = ["model__name", "reason", "actor_label"]
    date_hierarchy = "created_at"
    show_full_result_count = False
