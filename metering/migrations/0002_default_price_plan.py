"""The default price plan, so every customer can be billed before an operator assigns one."""
from decimal import Decimal

from django.db import migrations

# (axis, up_to, unit price in micro-units of USD); graduated tiers, the unbounded one last.
STANDARD = [
    ("images", Decimal(100_000), 500),   # $0.0005 an image for the first 100,000 a month
    ("images", None, 300),               # then $0.0003
    ("input_mb", None, 100),             # $0.10 per GB of input
    ("output_mp", None, 200),            # $0.0002 per output megapixel
    ("cpu_seconds", None, 1000),         # $0.001 per CPU-second
]


def create(apps, schema_editor):
    PricePlan = apps.get_model("metering", "PricePlan")
    PriceTier = apps.get_model("metering", "PriceTier")
    if PricePlan.objects.filter(is_default=True).exists():
        return
    plan, _ = PricePlan.objects.get_or_create(name="standard", defaults={"currency": "USD", "is_default": True})
    for axis, up_to, micros in STANDARD:
        PriceTier.objects.create(plan=plan, axis=axis, up_to=up_to, unit_price_micros=micros)


class Migration(migrations.Migration):
    dependencies = [("metering", "0001_initial")]
    operations = [migrations.RunPython(create, migrations.RunPython.noop)]
