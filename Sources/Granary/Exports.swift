@_exported import GranaryConfiguration
@_exported import GranaryCoordination
@_exported import GranaryMembership
@_exported import GranaryZooKeeper
@_exported import GranaryEngine
@_exported import GranaryMemory
@_exported import GranaryTransport
@_exported import GranaryVerbs
import SystemPackage

/// A file system path (swift-system's `FilePath`), as Granary's API takes it.
public typealias FilePath = SystemPackage.FilePath
