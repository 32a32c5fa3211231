@_exported import GranaryMemory
@_exported import GranaryTransport
