"""How a guest starts and what describes the machine to it: boot methods
(methods.py), ACPI tables (acpi.py, built with aml.py), the MP table."""
