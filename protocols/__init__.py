"""protocols: device-facing wire protocols — sans-I/O codecs and thin asyncio transports.

Must never import `gatewayd` or `engine`: transports talk to the gateway only through the
`LinkHandler` contract in `protocols.link`.
"""
