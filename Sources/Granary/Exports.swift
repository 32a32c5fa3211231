@_exported import GranaryConfiguration
@_exported import GranaryCoordination
@_exported import GranaryMembership
#if ZooKeeper
@_exported import GranaryZooKeeper
#endif
@_exported import GranaryEngine
@_exported import GranaryMemory
@_exported import GranaryTransport
#if RDMA
@_exported import GranaryVerbs
#endif
import SystemPackage

/// A file system path (swift-system's `FilePath`), as Granary's API takes it.
public typealias FilePath = SystemPackage.FilePath
