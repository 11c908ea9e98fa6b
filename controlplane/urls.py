from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularJSONAPIView, SpectacularSwaggerView

from controlplane import metrics, views
from controlplane.errors import get_only
from identity.authentication import admin_login_throttled
from metering import views as metering_views

admin.site.login = admin_login_throttled(admin.site.login)  # type: ignore[method-assign]

urlpatterns = [
    path("v1/resize", views.ResizeView.as_view(), name="resize"),
    path("v1/jobs/<str:job_id>", views.JobView.as_view(), name="job"),
    path("v1/jobs/<str:job_id>/result", views.JobResultView.as_view(), name="job-result"),
    path("v1/usage", metering_views.UsageView.as_view(), name="usage"),
    path("v1/admin/", include("identity.urls")),
    path("v1/openapi.json", SpectacularJSONAPIView.as_view(), name="openapi"),
    path("v1/docs", SpectacularSwaggerView.as_view(url_name="openapi"), name="docs"),
    path("healthz", get_only(views.healthz), name="healthz"),
    path("readyz", get_only(views.readyz), name="readyz"),
    path("admin/", admin.site.urls),
    # Every process of this server summed, plus queue, spool and identity state (controlplane/metrics.py).
    path("metrics", get_only(metrics.metrics_view), name="metrics"),
]

handler400 = "controlplane.errors.handler400"
handler404 = "controlplane.errors.handler404"
handler500 = "controlplane.errors.handler500"
