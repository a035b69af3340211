"""One exception type for everything a user can cause, so the CLI prints one clear line."""


class VidanonError(Exception):
    """A problem with the user's input or setup; its message is shown as is, on one line."""


class MediaError(VidanonError):
    """A video that cannot be read or written."""


class KeyMaterialError(VidanonError):
    """A missing, wrong or undecryptable key."""


class SidecarError(VidanonError):
    """A sidecar that is missing, malformed, from another version, or was altered."""
