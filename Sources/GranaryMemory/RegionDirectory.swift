import SystemPackage
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A node's region directory: one file per region replica the node holds, named by
/// ``RegionID/fileName``.
public struct RegionDirectory: Sendable, Hashable, CustomStringConvertible {
    /// The directory.
    public let path: FilePath

    /// Uses (and creates, with parents, if missing) the directory at `path`.
    public init(_ path: FilePath, create: Bool = true) throws(RegionError) {
        self.path = path
        if create { try Self.makeDirectories(path) }
    }

    /// The directory's path.
    public var description: String { path.string }

    /// The path of region `id`'s file in this directory.
    public func path(for id: RegionID) -> FilePath { path.appending(id.fileName) }

    /// Creates region `id` here. See ``Region/create(at:id:kind:size:cluster:slabShift:sparse:)``.
    public func create(_ id: RegionID, kind: RegionKind = .data, size: Int = RegionFormat.defaultSize,
                       cluster: ClusterID, slabShift: Int = RegionFormat.defaultSlabShift, sparse: Bool = false) throws(RegionError) -> Region {
        try Region.create(at: path(for: id), id: id, kind: kind, size: size, cluster: cluster, slabShift: slabShift, sparse: sparse)
    }

    /// Creates region `id` here from `spare` (a spare of this directory). See
    /// ``Region/create(at:id:kind:size:cluster:slabShift:from:)``.
    public func create(_ id: RegionID, kind: RegionKind = .data, size: Int, cluster: ClusterID,
                       slabShift: Int = RegionFormat.defaultSlabShift, from spare: SpareRegion) throws(RegionError) -> Region {
        try Region.create(at: path(for: id), id: id, kind: kind, size: size, cluster: cluster, slabShift: slabShift, from: spare)
    }

    /// Creates the lease page of `node`, linked from here. See
    /// ``Region/createLeasePage(at:id:cluster:)``.
    public func createLeasePage(of node: NodeID, cluster: ClusterID) throws(RegionError) -> Region {
        let id = RegionID.leasePage(of: node)
        return try Region.createLeasePage(at: path(for: id), id: id, cluster: cluster)
    }

    /// Opens region `id` here. See ``Region/open(at:expecting:cluster:)``.
    public func open(_ id: RegionID, cluster: ClusterID? = nil) throws(RegionError) -> Region {
        try Region.open(at: path(for: id), expecting: id, cluster: cluster)
    }

    /// Opens region `id` here, or creates it if there is no file for it. A file that exists but
    /// fails its checks is an error, never re-created.
    public func openOrCreate(_ id: RegionID, kind: RegionKind = .data, size: Int = RegionFormat.defaultSize,
                             cluster: ClusterID, slabShift: Int = RegionFormat.defaultSlabShift) throws(RegionError) -> Region {
        try openOrCreateSparse(id, kind: kind, size: size, cluster: cluster, slabShift: slabShift, sparse: false).region
    }

    /// ``openOrCreate(_:kind:size:cluster:slabShift:)``, creating a missing file `sparse` (see
    /// ``Region/create(at:id:kind:size:cluster:slabShift:sparse:)``); says whether it created it.
    public func openOrCreateSparse(_ id: RegionID, kind: RegionKind = .data, size: Int = RegionFormat.defaultSize,
                                   cluster: ClusterID, slabShift: Int = RegionFormat.defaultSlabShift,
                                   sparse: Bool = true) throws(RegionError) -> (region: Region, created: Bool) {
        do {
            return (try open(id, cluster: cluster), false)
        } catch .missing {
            return (try create(id, kind: kind, size: size, cluster: cluster, slabShift: slabShift, sparse: sparse), true)
        }
    }

    /// Sets region `id`'s file aside as superseded: renamed to `<name>.removed` (for an operator to
    /// remove), so that nothing opens it again; a missing file is left missing.
    package func setAside(_ id: RegionID) {
        let path = path(for: id).string
        guard access(path, F_OK) == 0 else { return }
        _ = rename(path, path + ".removed")
    }

    /// Sets every data region's file here aside (``setAside(_:)``); mailboxes stay.
    package func setAsideRegions() {
        for region in regionIDs() where region.mailboxOwner == nil { setAside(region) }
    }

    /// The region ids that have a file here (data regions and mailboxes), sorted.
    public func regionIDs() -> [RegionID] {
        guard let dir = path.withPlatformString({ opendir($0) }) else { return [] }
        defer { closedir(dir) }
        var ids: [RegionID] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(cString: raw.baseAddress!.assumingMemoryBound(to: CChar.self))
            }
            if name.hasPrefix("r"), name.hasSuffix(".region"), let n = UInt32(name.dropFirst().dropLast(7)) {
                ids.append(RegionID(rawValue: n))
            } else if name.hasPrefix("mailbox-n"), name.hasSuffix(".region"), let n = UInt16(name.dropFirst(9).dropLast(7)) {
                ids.append(RegionID.mailbox(of: NodeID(rawValue: n)))
            }
        }
        return ids.sorted()
    }

    static func makeDirectories(_ path: FilePath) throws(RegionError) {
        var prefix = FilePath(root: path.root)
        for component in path.components {
            prefix.append(component)
            let result = prefix.withPlatformString { mkdir($0, 0o755) }
            if result != 0, errno != EEXIST {
                throw .systemCall(call: "mkdir", path: prefix, message: String(cString: strerror(errno)))
            }
        }
    }
}
