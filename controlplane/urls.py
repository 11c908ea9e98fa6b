from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularJSONAPIView, SpectacularSwaggerView

from controlplane import views

urlpatterns = [
    path("v1/resize", views.ResizeView.as_view(), name="resize"),
    path("v1/jobs/<str:job_id>", views.JobView.as_view(), name="job"),
    path("v1/jobs/<str:job_id>/result", views.JobResultView.as_view(), name="job-result"),
    path("v1/openapi.json", SpectacularJSONAPIView.as_view(), name="openapi"),
    path("v1/docs", SpectacularSwaggerView.as_view(url_name="openapi"), name="docs"),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("admin/", admin.site.urls),
    path("", include("django_prometheus.urls")),
]

handler400 = "controlplane.errors.handler400"
handler404 = "controlplane.errors.handler404"
handler500 = "controlplane.errors.handler500"
