"""Instance drivers: run a release revision's model server in a hardened container (`docker`) or as
a supervised local process (`process`). See base.py for the interface."""

from manager.drivers.base import (
    Driver,
    DriverError,
    DriverUnavailableError,
    Instance,
    InstanceSpec,
    PortInUseError,
    get_driver,
    instance_name,
)

__all__ = [
    "Driver",
    "DriverError",
    "DriverUnavailableError",
    "Instance",
    "InstanceSpec",
    "PortInUseError",
    "get_driver",
    "instance_name",
]
