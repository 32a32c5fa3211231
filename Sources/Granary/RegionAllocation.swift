import Foundation
import GranaryConfiguration
import GranaryEngine
import GranaryMemory
import Logging
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Regions on demand for an embedded cluster on its static configuration (FaRM, NSDI'14 §3: "the
/// CM allocates regions on demand"): when a node's regions are full, a new region is added with
/// that node as its primary and backups on the nodes holding the fewest replicas, so a cluster's
/// capacity is not fixed when it is created.
///
/// Adding a region follows the order a restart needs:
/// 1. every replica's file is created (zeroed, registered with its node's transport, shared with
///    the other nodes' mappings);
/// 2. `cluster.json` is replaced (written, synced, renamed), so a reopen finds the region;
/// 3. every engine moves to the configuration with the region, the primary last: by the time it
///    can allocate there, every backup routes the region's records. The change keeps the routing
///    of every other region, so records in flight stay valid (``Configuration/keepsRouting(in:)``).
///
/// A crash before step 2 leaves unused files (opened again by the next request); after it, an
/// empty region that restart recovery opens like any other.
final class RegionAllocation: Sendable {
    private let storage: [NodeStorage]
    /// The engines by node index (the ones `storage` made).
    private let engines: [Engine]
    private let manifest: FilePath
    private let root: FilePath
    private let logger: Logger
    /// The configuration every engine is in; changed only here, under the lock.
    let current: Mutex<Configuration>

    init(configuration: Configuration, storage: [NodeStorage], engines: [Engine], root: FilePath, logger: Logger) {
        self.storage = storage
        self.engines = engines
        self.root = root
        self.manifest = root.appending("cluster.json")
        self.logger = logger
        self.current = Mutex(configuration)
    }

    /// Adds a region whose primary is `primary` (a ``RegionSupplier``).
    func addRegion(primary: NodeID) throws {
        try current.withLock { configuration in
            let placement = try configuration.placingNewRegion(primary: primary)
            var next = configuration
            next.id = configuration.id.next
            // Records stamped with the configurations before stay valid (the change keeps the
            // routing), in the running engines and for a restart's recovery alike.
            next.routingEpoch = configuration.routingEpoch ?? configuration.id
            next.regions.append(placement)
            try next.validate()
            // 1. The replicas' files.
            var created: [(NodeID, Region)] = []
            for node in placement.replicas {
                guard let home = storage.first(where: { $0.node == node }) else {
                    throw ConfigurationError.invalid("region \(placement.region) is placed on \(node), which has no storage here")
                }
                let region = try home.home.openOrCreate(placement.region, size: next.regionSize, cluster: next.cluster)
                guard region.kind == .data, region.size == next.regionSize else {
                    throw RegionError.corrupt(path: region.path, reason: "a \(region.kind) region of \(region.size) bytes where a new data region of \(next.regionSize) bytes is placed")
                }
                try home.transport.register(region)
                for other in storage where other.node != node { try other.sharedMemory?.adopt(region, of: node) }
                created.append((node, region))
            }
            // 2. Where a reopen finds it.
            try Cluster.writeManifest(next, to: manifest, root: root)
            // 3. Every engine, the primary last.
            let order = engines.filter { $0.node != primary } + engines.filter { $0.node == primary }
            for engine in order where next.contains(engine.node) {
                try engine.apply(next, adding: created.filter { $0.0 == engine.node }.map(\.1))
            }
            configuration = next
            logger.info("added region \(placement.region) on demand (\(next.id)): primary \(placement.primary), backups \(placement.backups)")
        }
    }
}

extension Cluster {
    /// Writes `configuration` to `cluster.json` durably: a temporary file, synced, renamed over the
    /// old one, the directory synced. Members' endpoints are stored relative to `root` so the
    /// cluster directory can move.
    static func writeManifest(_ configuration: Configuration, to manifest: FilePath, root: FilePath) throws {
        var stored = configuration
        stored.members = stored.members.map { Member(node: $0.node, endpoint: relative($0.endpoint, to: root), client: $0.client) }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let data = try encoder.encode(stored)
        let temporary = manifest.string + ".new"
        func fail(_ call: String, _ path: String) -> RegionError {
            RegionError.systemCall(call: call, path: FilePath(path), message: String(cString: strerror(errno)))
        }
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw fail("open", temporary) }
        let written = data.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        guard written == data.count, fsync(fd) == 0 else {
            let error = fail(written == data.count ? "fsync" : "write", temporary)
            close(fd)
            throw error
        }
        close(fd)
        guard rename(temporary, manifest.string) == 0 else { throw fail("rename", manifest.string) }
        let directory = open(root.string, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if directory >= 0 {
            _ = fsync(directory)
            close(directory)
        }
    }

    /// `endpoint` with a directory inside `root` made relative to it (the inverse of ``resolve(_:against:)``).
    static func relative(_ endpoint: String, to root: FilePath) -> String {
        guard let parsed = MemberEndpoint(endpoint), !parsed.isRemote else { return endpoint }
        var rest = FilePath(parsed.directory)
        guard rest.isAbsolute, rest.removePrefix(root) else { return endpoint }
        return parsed.with(directory: rest.string)
    }
}
