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
    /// A node's lease page: one page of memory that no file system backs (see
    /// ``RegionDirectory/createLeasePage(of:cluster:)``).
    case leasePage = 3

    /// `data`, `mailbox` or `lease page`.
    public var description: String {
        switch self {
        case .data: "data"
        case .mailbox: "mailbox"
        case .leasePage: "lease page"
        }
    }
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
    /// The memory file this process created for a lease page, kept open while the region lives
    /// (peers open it through `/proc/<pid>/fd/<descriptor>`); -1 for a region file.
    let descriptor: Int32

    private init(id: RegionID, kind: RegionKind, size: Int, cluster: ClusterID, path: FilePath,
                 isPersistentMemory: Bool, slabShift: Int, base: UnsafeMutableRawPointer, descriptor: Int32 = -1) {
        self.id = id
        self.kind = kind
        self.size = size
        self.cluster = cluster
        self.path = path
        self.isPersistentMemory = isPersistentMemory
        self.slabShift = slabShift
        self.base = base
        self.descriptor = descriptor
    }

    deinit {
        _ = pmem_unmap(base, size)
        if descriptor >= 0 {
            // A lease page's link goes with it, unless a later process has replaced it already.
            if Self.linkTarget(path) == "/proc/\(getpid())/fd/\(descriptor)" { _ = path.withPlatformString { unlink($0) } }
            close(descriptor)
        }
    }

    /// Where the symbolic link at `path` points, or nil.
    package static func linkTarget(_ path: FilePath) -> String? {
        var target = [CChar](repeating: 0, count: 256)
        let length = path.withPlatformString { readlink($0, &target, target.count - 1) }
        guard length > 0 else { return nil }
        return String(decoding: target.prefix(length).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// Creates a new region file at `path`, maps it and writes its header.
    ///
    /// - Parameters:
    ///   - path: the file to create.
    ///   - id: the region it holds a replica of.
    ///   - kind: data or mailbox.
    ///   - size: its length in bytes (a power of two from 1 MiB to 4 GiB).
    ///   - cluster: the cluster stamped into its header.
    ///   - slabShift: log2 of the slab size (data) or of the ring capacity (mailbox).
    ///   - sparse: create the file without reserving its space (no `posix_fallocate`, which on
    ///     tmpfs allocates and zeroes every page: about 15 ms for 64 MiB on this machine); the
    ///     caller reserves it later with ``reserveSpace(chunk:pausing:)``, off the path that waits for the
    ///     region (a new backup created during recovery).
    /// - Throws: ``RegionError/alreadyExists(path:)`` if any file is at `path` (never overwritten),
    ///   ``RegionError/invalidSize(bytes:reason:)``, or ``RegionError/systemCall(call:path:message:)``.
    public static func create(at path: FilePath, id: RegionID, kind: RegionKind = .data,
                              size: Int = RegionFormat.defaultSize, cluster: ClusterID,
                              slabShift: Int = RegionFormat.defaultSlabShift, sparse: Bool = false) throws(RegionError) -> Region {
        try RegionFormat.validate(size: size)
        guard access(path.string, F_OK) != 0 else { throw .alreadyExists(path: path) }
        removeUnfinishedCreations(of: path)
        // The file is made and given its header under a name of its own, then linked at `path`
        // (link never replaces a file): a process killed part-way leaves no file at `path` without
        // a header (which would fail every later open and stop the region from being made again),
        // only a `<name>.creating.<pid>.<n>` file, which a later creation of the region removes.
        let temporary = FilePath(path.string + ".creating.\(getpid()).\(UInt32.random(in: 0 ... .max))")
        var mappedLength = 0
        var isPmem: Int32 = 0
        let flags = PMEM_FILE_CREATE | PMEM_FILE_EXCL | (sparse ? PMEM_FILE_SPARSE : 0)
        guard let base = temporary.withPlatformString({
            pmem_map_file($0, size, flags, 0o644, &mappedLength, &isPmem)
        }) else {
            throw .systemCall(call: "pmem_map_file", path: temporary, message: pmemMessage(errno))
        }
        let region = Region(id: id, kind: kind, size: mappedLength, cluster: cluster, path: path,
                            isPersistentMemory: isPmem != 0,
                            slabShift: slabShift, base: base)
        defer { _ = temporary.withPlatformString { unlink($0) } }
        region.writeHeader()
        try region.persist(offset: 0, length: RegionFormat.headerBytes)
        let linked = temporary.withPlatformString { from in path.withPlatformString { link(from, $0) } }
        guard linked == 0 else {
            let code = errno
            if code == EEXIST { throw .alreadyExists(path: path) }
            throw .systemCall(call: "link", path: path, message: String(cString: strerror(code)))
        }
        syncDirectory(of: path)
        return region
    }

    /// Removes the files a creation of `path` left behind when its process was killed part-way
    /// (`<name>.creating.<pid>.<n>` of a process that no longer runs).
    private static func removeUnfinishedCreations(of path: FilePath) {
        guard let name = path.lastComponent?.string else { return }
        removeFilesOfEndedProcesses(in: path.removingLastComponent(), prefix: name + ".creating.")
    }

    /// Removes the files in `directory` named `<prefix><pid>.<anything>` whose process no longer
    /// runs.
    static func removeFilesOfEndedProcesses(in directory: FilePath, prefix: String) {
        guard let dir = directory.withPlatformString({ opendir($0) }) else { return }
        defer { closedir(dir) }
        while let entry = readdir(dir) {
            let entryName = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(cString: raw.baseAddress!.assumingMemoryBound(to: CChar.self))
            }
            guard entryName.hasPrefix(prefix),
                  let pid = entryName.dropFirst(prefix.count).split(separator: ".").first.flatMap({ Int32($0) }),
                  pid != getpid(), kill(pid, 0) != 0, errno == ESRCH else { continue }
            _ = directory.appending(entryName).withPlatformString { unlink($0) }
        }
    }

    /// Makes the directory entry of `path` durable (fsync of its directory); best effort: a file
    /// system that cannot sync a directory has nothing to lose by it.
    private static func syncDirectory(of path: FilePath) {
        let descriptor = path.removingLastComponent().withPlatformString { Glibc.open($0, O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
        guard descriptor >= 0 else { return }
        _ = fsync(descriptor)
        close(descriptor)
    }

    /// Creates a lease page: one page (``RegionFormat/headerBytes``) of a memory file (memfd) that
    /// no file system backs, with a region header, and a symbolic link at `path` to
    /// `/proc/<this process>/fd/<its descriptor>`, through which other processes on the host open
    /// it with ``open(at:expecting:cluster:)`` as long as this region lives (then the link dangles:
    /// the page of a process that is gone cannot be opened). A link left at `path` by an earlier
    /// process is replaced; the link goes with the region, unless a later page has replaced it.
    ///
    /// Stores to a file mapping wait, after the kernel wrote the page back, for the file system
    /// to mark it dirty again (ext4: a journal handle, which waits on the journal's commit under
    /// write load): a lease renewal must never wait on a disk, so lease words live here.
    ///
    /// - Throws: ``RegionError/systemCall(call:path:message:)`` naming the call that failed.
    public static func createLeasePage(at path: FilePath, id: RegionID, cluster: ClusterID) throws(RegionError) -> Region {
        #if os(Linux)
        let size = RegionFormat.headerBytes
        let descriptor = "granary-\(id)".withCString { granary_memfd_create($0) }
        guard descriptor >= 0 else {
            throw .systemCall(call: "memfd_create", path: path, message: String(cString: strerror(errno)))
        }
        func fail(_ call: String) -> RegionError {
            let error = RegionError.systemCall(call: call, path: path, message: String(cString: strerror(errno)))
            close(descriptor)
            return error
        }
        guard ftruncate(descriptor, off_t(size)) == 0 else { throw fail("ftruncate") }
        guard let base = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, descriptor, 0), base != MAP_FAILED else {
            throw fail("mmap")
        }
        let region = Region(id: id, kind: .leasePage, size: size, cluster: cluster, path: path,
                            isPersistentMemory: false, slabShift: 0, base: base, descriptor: descriptor)
        region.writeHeader()
        // The link: made under a name of this process's own, then renamed over `path`, so that a
        // peer opening `path` finds the old link or the new one, never none.
        let target = "/proc/\(getpid())/fd/\(descriptor)"
        let temporary = FilePath(path.string + ".\(getpid()).new")
        _ = temporary.withPlatformString { unlink($0) }
        let linked = target.withCString { target in temporary.withPlatformString { symlink(target, $0) } }
        guard linked == 0 else {
            throw .systemCall(call: "symlink", path: temporary, message: String(cString: strerror(errno)))
        }
        let renamed = temporary.withPlatformString { from in path.withPlatformString { rename(from, $0) } }
        guard renamed == 0 else {
            let message = String(cString: strerror(errno))
            _ = temporary.withPlatformString { unlink($0) }
            throw .systemCall(call: "rename", path: path, message: message)
        }
        return region
        #else
        throw .systemCall(call: "memfd_create", path: path, message: "lease pages need Linux")
        #endif
    }

    /// Reserves the file's space (`posix_fallocate` of its whole length; pages already written
    /// keep their bytes), for a region created `sparse`: afterwards a store into the mapping can
    /// no longer fail for want of space on its file system (a SIGBUS).
    ///
    /// - Throws: ``RegionError/systemCall(call:path:message:)`` naming the file (ENOSPC: its file
    ///   system is full).
    ///
    /// - Parameters:
    ///   - chunk: bytes reserved per call (the whole length at once by default).
    ///   - pausing: a wait after each chunk but the last, so that reserving a large region on
    ///     tmpfs (which zeroes every page it reserves) does not take the CPU from the node's
    ///     foreground work all at once.
    public func reserveSpace(chunk: Int? = nil, pausing: Duration = .zero) throws(RegionError) {
        try Self.reserve(path: path, size: size, chunk: chunk ?? size, pausing: pausing) { _, _ throws(RegionError) in }
    }

    /// Reserves the space of the file at `path` (`posix_fallocate`), `chunk` bytes at a time,
    /// calling `each(offset, length)` after each chunk, with a wait of `pausing` after each but
    /// the last.
    static func reserve(path: FilePath, size: Int, chunk: Int, pausing: Duration,
                        each: (Int, Int) throws(RegionError) -> Void) throws(RegionError) {
        let descriptor = path.withPlatformString { Glibc.open($0, O_RDWR | O_CLOEXEC) }
        guard descriptor >= 0 else {
            throw .systemCall(call: "open", path: path, message: String(cString: strerror(errno)))
        }
        defer { close(descriptor) }
        let step = max(4096, chunk)
        var offset = 0
        while offset < size {
            let length = min(step, size - offset)
            let result = posix_fallocate(descriptor, off_t(offset), off_t(length))
            guard result == 0 else {
                throw .systemCall(call: "posix_fallocate", path: path, message: String(cString: strerror(result)))
            }
            try each(offset, length)
            offset += length
            if pausing > .zero, offset < size {
                let (seconds, attoseconds) = pausing.components
                usleep(UInt32(min(Int64(1_000_000), seconds * 1_000_000 + attoseconds / 1_000_000_000_000)))
            }
        }
    }

    /// Writes the header (``RegionFormat``) of a new region.
    private func writeHeader() {
        Self.writeHeader(into: base, id: id, kind: kind, size: size, cluster: cluster, slabShift: slabShift)
    }

    private static func writeHeader(into base: UnsafeMutableRawPointer, id: RegionID, kind: RegionKind, size: Int,
                                    cluster: ClusterID, slabShift: Int) {
        base.storeBytes(of: RegionFormat.magic, toByteOffset: 0, as: UInt64.self)
        base.storeBytes(of: RegionFormat.version, toByteOffset: 8, as: UInt32.self)
        base.storeBytes(of: kind.rawValue, toByteOffset: 12, as: UInt32.self)
        base.storeBytes(of: id.rawValue, toByteOffset: 16, as: UInt32.self)
        base.storeBytes(of: UInt32(slabShift), toByteOffset: RegionFormat.slabShiftOffset, as: UInt32.self)
        base.storeBytes(of: UInt64(size), toByteOffset: 24, as: UInt64.self)
        base.storeBytes(of: cluster.rawValue, toByteOffset: 32, as: UInt64.self)
        base.storeBytes(of: RegionFormat.checksum(base), toByteOffset: 40, as: UInt64.self)
    }

    /// Makes `spare` region `id`'s file at `path`: writes the header into its mapping, makes it
    /// durable, links the file at `path` (never replacing a file there) and removes the spare's
    /// name. The region keeps the spare's mapping, whose pages are already allocated and mapped
    /// writable (``SpareRegion/prepare(chunk:pausing:)``), so that the records and copies a new
    /// replica takes at once fault no page in. On failure the spare stays a spare (its header
    /// cleared again), for another claim or for its owner to remove.
    ///
    /// - Throws: ``RegionError/alreadyExists(path:)`` if a file is at `path`, ``RegionError/invalidSize(bytes:reason:)``
    ///   if the spare's size is not `size`, ``RegionError/corrupt(path:reason:)`` if the spare
    ///   was claimed or not prepared, or ``RegionError/systemCall(call:path:message:)``.
    public static func create(at path: FilePath, id: RegionID, kind: RegionKind = .data, size: Int, cluster: ClusterID,
                              slabShift: Int = RegionFormat.defaultSlabShift,
                              from spare: SpareRegion) throws(RegionError) -> Region {
        try RegionFormat.validate(size: size)
        guard spare.size == size else {
            throw .invalidSize(bytes: spare.size, reason: "the spare region file \(spare.path) has \(spare.size) bytes, and region \(id) is to have \(size)")
        }
        guard access(path.string, F_OK) != 0 else { throw .alreadyExists(path: path) }
        let base = try spare.beginClaim()
        var claimed = false
        defer { spare.endClaim(claimed: claimed) }
        writeHeader(into: base, id: id, kind: kind, size: size, cluster: cluster, slabShift: slabShift)
        func undo() { memset(base, 0, RegionFormat.headerBytes) }
        if spare.isPersistentMemory {
            pmem_persist(base, RegionFormat.headerBytes)
        } else if pmem_msync(base, RegionFormat.headerBytes) != 0 {
            let error = RegionError.systemCall(call: "pmem_msync", path: spare.path, message: pmemMessage(errno))
            undo()
            throw error
        }
        let linked = spare.path.withPlatformString { from in path.withPlatformString { link(from, $0) } }
        guard linked == 0 else {
            let code = errno
            undo()
            if code == EEXIST { throw .alreadyExists(path: path) }
            throw .systemCall(call: "link", path: path, message: String(cString: strerror(code)))
        }
        _ = spare.path.withPlatformString { unlink($0) }
        syncDirectory(of: path)
        claimed = true
        return Region(id: id, kind: kind, size: size, cluster: cluster, path: path,
                      isPersistentMemory: spare.isPersistentMemory, slabShift: slabShift, base: base)
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
        if (kind == .leasePage) != (found.leasePageOwner != nil) {
            throw fail(.corrupt(path: path, reason: "a region of kind \(kind) with the id of \(found)"))
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
