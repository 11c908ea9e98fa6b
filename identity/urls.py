from django.urls import path

from identity import views

urlpatterns = [
    path("customers", views.CustomersView.as_view(), name="admin-customers"),
    path("customers/<str:customer_id>", views.CustomerView.as_view(), name="admin-customer"),
    path("customers/<str:customer_id>/keys", views.CustomerKeysView.as_view(), name="admin-customer-keys"),
    path("customers/<str:customer_id>/audit", views.CustomerAuditView.as_view(), name="admin-customer-audit"),
    path("keys/<str:key_id>", views.KeyView.as_view(), name="admin-key"),
]
