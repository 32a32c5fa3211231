import CPMem
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A region file made before any region needs it: its space reserved and its pages mapped
/// writable into this process, so that a replica placed on the node while it serves (a new
/// backup during recovery, a region added on demand) starts with memory that is already there,
/// as a FaRM machine's is.
///
/// A new file's pages are not there until something stores into them: each first store faults
/// one page in (on ext4 a read of the hole, a page allocation and the file system's
/// `page_mkwrite`; on tmpfs an allocation and a zeroing). A new backup takes records and copies
/// into pages all over its region at once: made sparse during recovery, the faults of a few new
/// 64 MiB backups took a fifth of this 2-core machine's CPU for tens of milliseconds after
/// recovery, when the foreground was to come back. A spare pays for them beforehand, paced.
///
/// Its file is `spare.<pid>.<n>` in a region directory; it is no region (no header) until
/// ``Region/create(at:id:kind:size:cluster:slabShift:from:)`` claims it, and it is removed when
/// this object goes unclaimed, or, left by a process that ended, by ``removeLeftovers(in:)``.
///
/// `@unchecked Sendable`: `path`, `size`, `isPersistentMemory` and `base` never change; the mapping
/// belongs to this object until a claim succeeds and to the claiming ``Region`` after; `state`
/// (atomic) lets one claim in at a time, only once ``prepare(chunk:pausing:)`` has finished, and
/// none after one succeeded, so that two regions never share the mapping and it is unmapped once.
public final class SpareRegion: @unchecked Sendable {
    /// The spare's file.
    public let path: FilePath
    /// Its length in bytes.
    public let size: Int
    let base: UnsafeMutableRawPointer
    let isPersistentMemory: Bool
    private let state = Atomic<UInt8>(State.made)

    private enum State {
        static let made: UInt8 = 0
        static let prepared: UInt8 = 1
        static let claiming: UInt8 = 2
        static let claimed: UInt8 = 3
    }

    /// The file-name prefix of spares.
    static let prefix = "spare."

    private init(path: FilePath, size: Int, base: UnsafeMutableRawPointer, isPersistentMemory: Bool) {
        self.path = path
        self.size = size
        self.base = base
        self.isPersistentMemory = isPersistentMemory
    }

    deinit {
        guard state.load(ordering: .acquiring) != State.claimed else { return }
        _ = pmem_unmap(base, size)
        _ = path.withPlatformString { unlink($0) }
    }

    /// Makes a spare of `size` bytes (a valid region size) in `directory`, sparse: nothing is
    /// reserved or mapped in until ``prepare(chunk:pausing:)``.
    ///
    /// - Throws: ``RegionError/invalidSize(bytes:reason:)`` or ``RegionError/systemCall(call:path:message:)``.
    public static func create(in directory: RegionDirectory, size: Int) throws(RegionError) -> SpareRegion {
        try RegionFormat.validate(size: size)
        let path = directory.path.appending("\(prefix)\(getpid()).\(UInt32.random(in: 0 ... .max))")
        var mappedLength = 0
        var isPmem: Int32 = 0
        guard let base = path.withPlatformString({
            pmem_map_file($0, size, PMEM_FILE_CREATE | PMEM_FILE_EXCL | PMEM_FILE_SPARSE, 0o644, &mappedLength, &isPmem)
        }) else {
            throw .systemCall(call: "pmem_map_file", path: path, message: pmemMessage(errno))
        }
        return SpareRegion(path: path, size: mappedLength, base: base, isPersistentMemory: isPmem != 0)
    }

    /// Reserves the file's space (`posix_fallocate`, so that no store into it can fail later for
    /// want of space) and maps every page in writable (`madvise(MADV_POPULATE_WRITE)`, or a store
    /// into each page where the kernel lacks it), `chunk` bytes at a time with a wait of `pausing`
    /// after each, so that preparing a large spare never takes the CPU from the foreground at once.
    /// Once it returns, the spare can be claimed.
    ///
    /// - Throws: ``RegionError/systemCall(call:path:message:)`` naming the file (ENOSPC: its file
    ///   system is full).
    public func prepare(chunk: Int = 1 << 20, pausing: Duration = .zero) throws(RegionError) {
        guard state.load(ordering: .acquiring) == State.made else { return }
        let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))
        var populate = true
        try Region.reserve(path: path, size: size, chunk: max(pageSize, chunk), pausing: pausing) { (offset, length) throws(RegionError) in
            if populate, madvise(base + offset, length, Self.populateWrite) != 0 {
                guard errno == EINVAL else {
                    throw .systemCall(call: "madvise(MADV_POPULATE_WRITE)", path: path, message: String(cString: strerror(errno)))
                }
                populate = false  // a kernel before 5.14
            }
            if !populate {
                var page = offset
                while page < offset + length {
                    (base + page).storeBytes(of: 0, as: UInt8.self)
                    page += pageSize
                }
            }
        }
        state.store(State.prepared, ordering: .releasing)
    }

    /// Whether ``prepare(chunk:pausing:)`` has finished and no claim has taken the spare.
    public var isReady: Bool { state.load(ordering: .acquiring) == State.prepared }

    /// `MADV_POPULATE_WRITE` (Linux 5.14).
    private static let populateWrite: Int32 = 23

    /// Begins a claim: the mapping, if the spare is prepared and unclaimed.
    func beginClaim() throws(RegionError) -> UnsafeMutableRawPointer {
        guard state.compareExchange(expected: State.prepared, desired: State.claiming, ordering: .acquiringAndReleasing).exchanged else {
            throw .corrupt(path: path, reason: "the spare region file is not prepared, or another claim took it")
        }
        return base
    }

    /// Ends a claim begun by ``beginClaim()``: the mapping now belongs to the new region, or the
    /// spare stays a spare.
    func endClaim(claimed: Bool) {
        state.store(claimed ? State.claimed : State.prepared, ordering: .releasing)
    }

    /// Whether `directory` is on a file system whose pages are memory and stay so (tmpfs,
    /// ramfs): where spares pay. On a disk file system the kernel writes a spare's pages back
    /// and write-protects them (the next store faults again), and preparing spares there, with
    /// gigabytes of other writes in flight, stalled the lease threads of every node of this
    /// machine past their leases: removals of live nodes, in every trial.
    public static func isMemoryFileSystem(_ directory: RegionDirectory) -> Bool {
        #if os(Linux)
        let type = directory.path.withPlatformString { granary_file_system_type($0) }
        let tmpfs = 0x0102_1994, ramfs = 0x8584_58f6
        return type == tmpfs || type == ramfs
        #else
        return false
        #endif
    }

    /// Removes the spares in `directory` that processes which no longer run left behind.
    public static func removeLeftovers(in directory: RegionDirectory) {
        Region.removeFilesOfEndedProcesses(in: directory.path, prefix: prefix)
    }
}
