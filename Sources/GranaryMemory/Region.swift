import CPMem
import SystemPackage
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What a region file holds.
public enum RegionKind: UInt32, Sendable, Codable, CustomStringConvertible {
    /// Replicated objects managed by a slab allocator.
    case data = 1
    /// A node-local mailbox: the receive rings of the node's message channels.
    case mailbox = 2

    /// `data` or `mailbox`.
    public var description: String { self == .data ? "data" : "mailbox" }
}

/// The on-disk header of a region file (the first ``RegionFormat/headerBytes`` bytes).
///
/// ```
/// offset  size  field
///      0     8  magic "GRANARY1" (RegionFormat.magic)
///      8     4  format version
///     12     4  kind (RegionKind)
///     16     4  region id
///     20     4  log2 of the slab size (data regions) or of the ring capacity (mailboxes)
///     24     8  region size in bytes (the file's length)
///     32     8  owner cluster id
///     40     8  FNV-1a checksum of bytes 0..<40
/// ```
public enum RegionFormat {
    /// The first 8 bytes of every region file: "GRANARY1" read as a little-endian integer.
    public static let magic: UInt64 = 0x3159_5241_4E41_5247  // "GRANARY1" little-endian
    /// The header format this build writes and reads.
    public static let version: UInt32 = 1
    /// Bytes reserved for the header at the start of a region (4 KiB): a data region's slab
    /// table, or a mailbox's first ring, follows it.
    public static let headerBytes = 4096
    /// A region's size when its creator does not choose: 64 MiB.
    public static let defaultSize = 64 << 20
    /// The smallest region size: 1 MiB.
    public static let minimumSize = 1 << 20
    /// The largest region size: 4 GiB (a ``GlobalAddress`` offset has 32 bits).
    public static let maximumSize = 1 << 32
    /// log2 of a data region's slab size unless its creator says otherwise (64 KiB slabs).
    public static let defaultSlabShift = 16
    /// Where the header keeps log2 of the slab size (or ring capacity): a peer reads it one-sided.
    public static let slabShiftOffset = 20

    static func checksum(_ base: UnsafeRawPointer) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for i in 0..<40 {
            hash ^= UInt64(base.load(fromByteOffset: i, as: UInt8.self))
            hash = hash &* 0x100_0000_01b3
        }
        return hash
    }

    /// Checks a requested region size: a power of two within the supported bounds.
    public static func validate(size: Int) throws(RegionError) {
        guard size > 0, size & (size - 1) == 0 else {
            throw .invalidSize(bytes: size, reason: "it must be a power of two")
        }
        guard size >= minimumSize, size <= maximumSize else {
            throw .invalidSize(bytes: size, reason: "it must be between \(minimumSize) and \(maximumSize) bytes")
        }
    }
}

/// One replica of a region: a fixed-size file mapped into this process with libpmem.
///
/// The mapping is persistent memory where libpmem says so (then ``persist(offset:length:)`` flushes
/// CPU caches with `pmem_persist`) and an ordinary shared file mapping otherwise (then it calls
/// `pmem_msync`). Other processes on the host map the same file, which is what the shared-memory
/// transport's one-sided operations act on.
///
/// `@unchecked Sendable`: every stored property is immutable after `init`; the mapped bytes are shared
/// memory whose concurrent access is governed by Granary's protocols (atomics on header words,
/// per-cache-line versions), not by this class. The mapping lives until `deinit`.
public final class Region: @unchecked Sendable {
    /// The region this file is a replica of (the header's region id).
    public let id: RegionID
    /// Whether the file holds data objects or a mailbox's rings.
    public let kind: RegionKind
    /// The file's length and the mapping's length in bytes.
    public let size: Int
    /// The cluster the file belongs to (the header's owner cluster id).
    public let cluster: ClusterID
    /// The region file.
    public let path: FilePath
    /// Whether libpmem reports the mapping as persistent memory.
    public let isPersistentMemory: Bool
    /// log2 of the slab size (data regions) or of each ring's capacity (mailboxes).
    public let slabShift: Int
    /// The first mapped byte.
    public let base: UnsafeMutableRawPointer

    private init(id: RegionID, kind: RegionKind, size: Int, cluster: ClusterID, path: FilePath,
                 isPersistentMemory: Bool, slabShift: Int, base: UnsafeMutableRawPointer) {
        self.id = id
        self.kind = kind
        self.size = size
        self.cluster = cluster
        self.path = path
        self.isPersistentMemory = isPersistentMemory
        self.slabShift = slabShift
        self.base = base
    }

    deinit {
        _ = pmem_unmap(base, size)
    }

    /// Creates a new region file at `path`, maps it and writes its header.
    ///
    /// - Throws: ``RegionError/alreadyExists(path:)`` if any file is at `path` (never overwritten),
    ///   ``RegionError/invalidSize(bytes:reason:)``, or ``RegionError/systemCall(call:path:message:)``.
    public static func create(at path: FilePath, id: RegionID, kind: RegionKind = .data,
                              size: Int = RegionFormat.defaultSize, cluster: ClusterID,
                              slabShift: Int = RegionFormat.defaultSlabShift) throws(RegionError) -> Region {
        try RegionFormat.validate(size: size)
        var mappedLength = 0
        var isPmem: Int32 = 0
        guard let base = path.withPlatformString({
            pmem_map_file($0, size, PMEM_FILE_CREATE | PMEM_FILE_EXCL, 0o644, &mappedLength, &isPmem)
        }) else {
            let code = errno
            if code == EEXIST { throw .alreadyExists(path: path) }
            throw .systemCall(call: "pmem_map_file", path: path, message: pmemMessage(code))
        }
        let region = Region(id: id, kind: kind, size: mappedLength, cluster: cluster, path: path,
                            isPersistentMemory: isPmem != 0,
                            slabShift: slabShift, base: base)
        base.storeBytes(of: RegionFormat.magic, toByteOffset: 0, as: UInt64.self)
        base.storeBytes(of: RegionFormat.version, toByteOffset: 8, as: UInt32.self)
        base.storeBytes(of: kind.rawValue, toByteOffset: 12, as: UInt32.self)
        base.storeBytes(of: id.rawValue, toByteOffset: 16, as: UInt32.self)
        base.storeBytes(of: UInt32(region.slabShift), toByteOffset: RegionFormat.slabShiftOffset, as: UInt32.self)
        base.storeBytes(of: UInt64(mappedLength), toByteOffset: 24, as: UInt64.self)
        base.storeBytes(of: cluster.rawValue, toByteOffset: 32, as: UInt64.self)
        base.storeBytes(of: RegionFormat.checksum(base), toByteOffset: 40, as: UInt64.self)
        try region.persist(offset: 0, length: RegionFormat.headerBytes)
        return region
    }

    /// Opens and maps an existing region file, checking its header.
    ///
    /// - Parameters:
    ///   - path: the region file.
    ///   - id: the region the caller expects the file to hold, if it knows.
    ///   - cluster: the cluster the caller belongs to, if it knows.
    /// - Throws: ``RegionError`` naming the file when it is missing, truncated, foreign, of another
    ///   format version, corrupt, or holds another region or cluster. The file is never modified.
    public static func open(at path: FilePath, expecting id: RegionID? = nil,
                            cluster: ClusterID? = nil) throws(RegionError) -> Region {
        var info = stat()
        let statResult = path.withPlatformString { stat($0, &info) }
        if statResult != 0 {
            let code = errno
            if code == ENOENT { throw .missing(path: path) }
            throw .systemCall(call: "stat", path: path, message: String(cString: strerror(code)))
        }
        let fileSize = Int(info.st_size)
        guard fileSize >= RegionFormat.headerBytes else {
            throw .truncated(path: path, actualBytes: fileSize, expectedBytes: RegionFormat.headerBytes)
        }
        var mappedLength = 0
        var isPmem: Int32 = 0
        guard let base = path.withPlatformString({
            pmem_map_file($0, 0, 0, 0, &mappedLength, &isPmem)
        }) else {
            throw .systemCall(call: "pmem_map_file", path: path, message: pmemMessage(errno))
        }
        // Validate before handing out the mapping; unmap on every failure.
        func fail(_ error: RegionError) -> RegionError {
            _ = pmem_unmap(base, mappedLength)
            return error
        }
        let magic = base.loadUnaligned(fromByteOffset: 0, as: UInt64.self)
        guard magic == RegionFormat.magic else { throw fail(.foreign(path: path, magic: magic)) }
        let version = base.loadUnaligned(fromByteOffset: 8, as: UInt32.self)
        guard version == RegionFormat.version else { throw fail(.unsupportedFormat(path: path, version: version)) }
        let storedChecksum = base.loadUnaligned(fromByteOffset: 40, as: UInt64.self)
        guard storedChecksum == RegionFormat.checksum(base) else {
            throw fail(.corrupt(path: path, reason: "header checksum mismatch"))
        }
        guard let kind = RegionKind(rawValue: base.loadUnaligned(fromByteOffset: 12, as: UInt32.self)) else {
            throw fail(.corrupt(path: path, reason: "unknown region kind"))
        }
        let found = RegionID(rawValue: base.loadUnaligned(fromByteOffset: 16, as: UInt32.self))
        let slabShift = Int(base.loadUnaligned(fromByteOffset: RegionFormat.slabShiftOffset, as: UInt32.self))
        let recordedSize = Int(base.loadUnaligned(fromByteOffset: 24, as: UInt64.self))
        let owner = ClusterID(rawValue: base.loadUnaligned(fromByteOffset: 32, as: UInt64.self))
        if let id, found != id { throw fail(.wrongRegion(path: path, found: found, expected: id)) }
        if let cluster, owner != cluster { throw fail(.wrongCluster(path: path, found: owner, expected: cluster)) }
        guard recordedSize == fileSize else {
            throw fail(.truncated(path: path, actualBytes: fileSize, expectedBytes: recordedSize))
        }
        if kind == .data, !(SlabLayout.minimumSlabShift...SlabLayout.maximumSlabShift).contains(slabShift) {
            throw fail(.corrupt(path: path, reason: "slab size 2^\(slabShift) is outside the supported range"))
        }
        if kind == .mailbox, !(12..<32).contains(slabShift) {
            throw fail(.corrupt(path: path, reason: "ring capacity 2^\(slabShift) is outside the supported range"))
        }
        return Region(id: found, kind: kind, size: mappedLength, cluster: owner, path: path,
                      isPersistentMemory: isPmem != 0, slabShift: slabShift, base: base)
    }

    /// Makes `length` bytes at `offset` durable: `pmem_persist` on persistent memory, `pmem_msync`
    /// on an ordinary file mapping.
    public func persist(offset: Int, length: Int) throws(RegionError) {
        try checkBounds(offset: offset, length: length)
        let start = base + offset
        if isPersistentMemory {
            pmem_persist(start, length)
        } else if pmem_msync(start, length) != 0 {
            throw .systemCall(call: "pmem_msync", path: path, message: pmemMessage(errno))
        }
    }

    /// Throws ``RegionError/outOfBounds(region:offset:length:size:)`` unless the range is inside.
    @inlinable
    public func checkBounds(offset: Int, length: Int) throws(RegionError) {
        guard offset >= 0, length >= 0, offset <= size &- length else {
            throw .outOfBounds(region: id, offset: offset, length: length, size: size)
        }
    }
}

func pmemMessage(_ code: Int32) -> String {
    if let message = pmem_errormsg(), message.pointee != 0 { return String(cString: message) }
    return String(cString: strerror(code))
}
