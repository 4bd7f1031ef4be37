"""IEEE 802.1AR IDevID onboarding: which registered device a manufacturer's certificate names."""
from __future__ import annotations

from cryptography import x509

from .credentials import IDevIDAuth
from .errors import UnauthorizedError, UnknownDeviceError
from .model import Device


def serial_of(cert: x509.Certificate) -> str:
    """IEEE 802.1AR: the IDevID subject carries the device's serialNumber attribute."""
    values = cert.subject.get_attributes_for_oid(x509.NameOID.SERIAL_NUMBER)
    if not values:
        raise UnauthorizedError("the IDevID certificate has no serialNumber in its subject")
    return str(values[0].value)


def same_maker(registered: str, manufacturer: str) -> bool:
    return not registered or registered.casefold() == manufacturer.casefold()


def device_for(devices: list[Device], credential: IDevIDAuth) -> str:
    serial = serial_of(credential.certificate)
    matches = [d for d in devices if d.serial_number == serial and same_maker(d.manufacturer, credential.manufacturer)]
    if len(matches) != 1:
        raise UnknownDeviceError(
            f"no single registered device has serial number {serial!r} from {credential.manufacturer}"
            if not matches else f"several devices have serial number {serial!r}; set their manufacturer")
    return matches[0].id


def check(device: Device, credential: IDevIDAuth) -> None:
    serial = serial_of(credential.certificate)
    if device.serial_number != serial or not same_maker(device.manufacturer, credential.manufacturer):
        raise UnauthorizedError(f"the IDevID certificate ({credential.manufacturer}, serial number "
                                f"{serial!r}) does not belong to device {device.id}")
