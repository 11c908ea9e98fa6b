"""The Django project: settings, URLs and the customer REST API (thin views over the services)."""
