"""API tokens from the dashboard: a member makes (shown once), names, lists and revokes them."""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from r1platform.accounts import services
from r1platform.accounts.models import ApiToken
from r1platform.accounts.scoping import teams_for


class TokenForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="what it is for, e.g. 'CI uploads'")
    team = forms.ModelChoiceField(queryset=None, empty_label=None)

    def __init__(self, user, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["team"].queryset = teams_for(user).order_by("name")


@login_required
def tokens(request):
    form = TokenForm(request.user, request.POST or None)
    created = None
    if request.method == "POST" and form.is_valid():
        token, raw = services.issue_token(
            request.user, form.cleaned_data["team"].pk, form.cleaned_data["name"]
        )
        # Shown in this answer only: the database keeps its hash.
        created = {"token": token, "raw": raw}
        form = TokenForm(request.user)
    mine = ApiToken.objects.filter(user=request.user).select_related("team")
    context = {
        "form": form,
        "created": created,
        "tokens": mine.order_by("revoked_at", "-created_at"),
        "usable": set(mine.usable().values_list("pk", flat=True)),
    }
    response = render(request, "accounts/tokens.html", context, status=201 if created else 200)
    response["Cache-Control"] = "no-store"  # the raw token must not stay in a cache
    return response


@login_required
@require_POST
def revoke(request, pk: int):
    token = get_object_or_404(ApiToken, pk=pk, user=request.user)  # only one's own
    if services.revoke_own_token(request.user, token.pk):
        messages.success(request, f"Token “{token.name}” revoked: it no longer works anywhere.")
    else:
        messages.info(request, f"Token “{token.name}” was already revoked.")
    return redirect("accounts:tokens")
