"""postfix-mtasts: MTA-STS (RFC 8461) for Postfix, as a socketmap policy table."""

__version__ = "0.1.0"
