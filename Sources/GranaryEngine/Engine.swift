import GranaryConfiguration
import GranaryMemory
import GranaryTransport
import CoreMetrics
import Dispatch
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The lease words of a node, in its lease page (``RegionID/leasePage(of:)``: memory that no file
/// system backs, so that a renewal never waits for a file page to be made writable again after
/// writeback, which on ext4 waits on the journal), on the line after the page's header: the node's
/// own counter, renewed by its lease thread and read one-sidedly by the CM; the CM's grant to it;
/// the newest configuration id the CM announced (NEW-CONFIG).
package enum LeaseWords {
    package static let counterOffset = 64
    package static let grantOffset = counterOffset + 8
    package static let announcedOffset = counterOffset + 16

    package static func counterAddress(of node: NodeID) -> GlobalAddress { address(counterOffset, of: node) }
    package static func grantAddress(of node: NodeID) -> GlobalAddress { address(grantOffset, of: node) }
    package static func announcedAddress(of node: NodeID) -> GlobalAddress { address(announcedOffset, of: node) }
    private static func address(_ offset: Int, of node: NodeID) -> GlobalAddress {
        GlobalAddress(region: .leasePage(of: node), offset: UInt32(offset))
    }
}

/// Tunables of a node's transaction engine.
public struct EngineOptions: Sendable {
    /// Attempts before `transaction` gives up with ``TransactionError/conflict(_:attempts:)``.
    public var maximumAttempts: Int = 64
    /// Back-off between attempts: a random wait up to `base << attempt`, capped.
    public var retryBackoffBaseNanoseconds: UInt64 = 2_000
    /// The longest back-off between attempts, in nanoseconds (2 ms by default).
    public var retryBackoffCapNanoseconds: UInt64 = 2_000_000
    /// Reads retried while an object is locked or torn before the attempt aborts.
    public var readAttempts: Int = 2_000
    /// How long a coordinator waits for LOCK replies.
    public var replyTimeout: Duration = .seconds(10)
    /// How long `Node.transaction` (the async form) waits for LOCK replies on its thread before
    /// it suspends and lets the thread run other tasks, checking again after growing pauses (up
    /// to 1 ms) until the replies are in or ``replyTimeout`` runs out. nil: it waits on its
    /// thread, as the synchronous forms always do. Replies usually take microseconds; a silent
    /// or paused peer would otherwise hold a thread of the cooperative pool for the whole timeout.
    /// 1 ms by default: a waiting coordinator also serves its process's mailboxes, and a shorter
    /// spin (50 us was tried) made an embedded cluster's async transactions 4x slower and, with
    /// more commits in flight than pool threads, let commits waiting for ring space on every
    /// thread of the pool hold back the suspended ones that would free it (until the send
    /// timeout). Waits for ring space still block the thread.
    public var lockWaitSpin: Duration? = .milliseconds(1)
    /// Committed transactions per backup collected before a TRUNCATE record is sent.
    public var truncationBatch: Int = 32
    /// `pmem_persist`/`pmem_msync` every installed object. Off by default: the region files are
    /// shared mappings, so a committed write survives the death of any process; turn this on to
    /// survive the loss of the machine's power as well (at the cost of an msync per object on
    /// ordinary files).
    public var persistEveryInstall: Bool = false
    /// Phase timers (and `Statistics` phase means) time one attempt in this many (1: every one);
    /// committed and aborted counts are always exact.
    public var phaseTimingInterval: Int = 8
    /// The longest an idle poller sleeps between polls.
    public var pollerMaximumSleepMicroseconds: UInt32 = 50
    /// How many times an idle poller yields the CPU (`sched_yield`) before it starts sleeping.
    /// 0 (the default) suits nodes whose coordinators share the process and help poll; a node
    /// process that serves other processes' coordinators (`granary node`) yields for a while, so
    /// that a record arriving soon after the last is taken without a sleep's delay.
    public var pollerYields: UInt32 = 0
    /// Where the engine's metrics go; nil means the process-wide `MetricsSystem.factory` that the
    /// application bootstrapped (a library never bootstraps it).
    public var metricsFactory: (any MetricsFactory)?
    /// A deliberately broken commit protocol, for showing that a checker catches what it breaks
    /// (`granary check run --break`). Never set otherwise.
    package var sabotage: ProtocolSabotage?

    /// Options with the default stated on each property.
    public init() {}
}

/// The ways ``EngineOptions/sabotage`` breaks FaRM's commit protocol.
package enum ProtocolSabotage: String, Sendable, CaseIterable {
    /// VALIDATE always passes: objects read but not written are never checked again, so a
    /// transaction can commit on a read another one overwrote (write skew, read skew).
    case skipValidation = "skip-validate"
    /// A primary locks an object at whatever version it holds, not the one the coordinator read:
    /// a write can overwrite a write it never saw (lost update).
    case skipLockCheck = "skip-lock-check"
}

/// One replica of a region held by this node.
final class LocalReplica: Sendable {
    let region: Region
    let layout: SlabLayout
    /// Present where this node is the region's primary.
    let allocator: SlabAllocator?

    /// A replica of `region`; at its primary, with an allocator rebuilt from the region's bytes:
    /// the slab table now, the slot headers in the background (allocator recovery: a promoted
    /// backup serves before every header is read; see ``SlabAllocator``).
    init(region: Region, isPrimary: Bool) {
        self.region = region
        self.layout = SlabLayout(regionSize: region.size, slabShift: region.slabShift)
        if isPrimary {
            let allocator = SlabAllocator(region: region, scan: .background)
            self.allocator = allocator
            if allocator.isScanning {
                DispatchQueue.global(qos: .utility).async { while allocator.scanStep() {} }
            }
        } else {
            self.allocator = nil
        }
    }
}

/// A replica as the record processor's hot paths use it: no reference counting per access. The
/// references are unretained; the ``ConfigurationView`` that hands these out keeps the
/// ``LocalReplica`` (and so its region and allocator) alive, and a caller uses one only while it
/// holds that view.
struct ReplicaAccess {
    let base: UnsafeMutableRawPointer
    let layout: SlabLayout
    /// The region (reached with ``withRegion(_:)``: passing an `unowned(unsafe)` reference to a
    /// call retains it, an atomic on a line both cores use, once per backup entry applied).
    let region: Unmanaged<Region>
    /// Present where this node is the region's primary.
    let allocator: Unmanaged<SlabAllocator>?

    init(_ replica: LocalReplica) {
        base = replica.region.base
        layout = replica.layout
        region = Unmanaged.passUnretained(replica.region)
        allocator = replica.allocator.map { Unmanaged.passUnretained($0) }
    }

    /// The region's size in bytes (its layout's).
    var size: Int { layout.regionSize }

    /// Runs `body` with the region, without reference counting.
    @inline(__always) func withRegion<R>(_ body: (Region) throws -> R) rethrows -> R {
        try region._withUnsafeGuaranteedRef(body)
    }

    var isPrimary: Bool { allocator != nil }

    /// The primary's slot of the object at `offset` (see ``SlabAllocator/slot(at:)``); nil at a backup.
    @inline(__always) func slot(at offset: Int) throws(AllocationError) -> ObjectSlot? {
        guard let allocator else { return nil }
        let result: Result<ObjectSlot, AllocationError> = allocator._withUnsafeGuaranteedRef { allocator in
            do throws(AllocationError) { return .success(try allocator.slot(at: offset)) } catch { return .failure(error) }
        }
        return try result.get()
    }

    func didAllocate(_ slot: ObjectSlot, persist: Bool) { allocator?._withUnsafeGuaranteedRef { $0.didAllocate(slot, persist: persist) } }
    /// Commits a free: `install` writes the slot's free header; at the primary under the
    /// allocator's lock, which then lists the slot free (``SlabAllocator/didFree(_:installing:)``).
    @inline(__always) func didFree(_ slot: ObjectSlot, installing install: () -> Void) {
        if let allocator {
            allocator._withUnsafeGuaranteedRef { $0.didFree(slot, installing: install) }
        } else {
            install()
        }
    }
}

/// One configuration as this node uses it: the lookup tables derived from it. Immutable; a new
/// configuration gets a new view (``Engine/apply(_:)``).
///
/// `@unchecked Sendable`: every property is immutable after `init`; `senderTable` holds unretained
/// references to the senders that the `senders` array keeps alive for the view's lifetime.
package final class ConfigurationView: @unchecked Sendable {
    package let configuration: Configuration
    /// The first configuration with this one's routing (members, and each region's primary and
    /// backups): records stamped with it or any later one route as this one does and are taken.
    /// Changes that keep the routing (a new manager, a copy completed, a new member or region)
    /// do not move it, so records in flight across them stay valid; a change of routing goes
    /// through transaction recovery, which drains every record of the configurations before.
    let routingEpoch: ConfigurationID
    /// `configuration.id`, kept apart: reading it through `configuration` copies the value and
    /// its arrays' references on every record.
    let configurationID: ConfigurationID
    let node: NodeID
    /// This node's replicas, by region index.
    let replicaTable: [LocalReplica?]
    /// Primary node of each region, by region index (NodeID.limit where the region is unknown).
    let primaries: [UInt16]
    /// The backups of each region as a bit per node, by region index.
    let backupMasks: UnsafeMutablePointer<UInt64>
    /// Senders into each member's log ring (the commit protocol's records).
    let senders: [ChannelSender?]
    /// Senders into each member's message queue (LOCK replies).
    let replySenders: [ChannelSender?]
    let allocationRegions: [RegionID]
    /// Bit n set when node n is a member.
    let memberBits: UInt64
    /// Set when the node crashes (``Engine/crash()``): nothing more is sent through this view.
    let sendsStopped = Atomic<Bool>(false)
    /// The largest record this configuration's channels carry (the smallest maximum over the
    /// members' channels): a LOCK or COMMIT-BACKUP record must fit.
    let maximumRecordBytes: Int

    /// - Parameter ringCapacity: this node's own mailbox ring size, which channels to a client
    ///   member that is not running yet assume until they attach.
    init(node: NodeID, configuration: Configuration, regions: [Region], previous: ConfigurationView?,
         transport: any Transport, ringCapacity: Int) throws {
        self.configuration = configuration
        self.configurationID = configuration.id
        self.node = node
        if let previous {
            // Routing changed: a member left, or a region's primary or backups changed.
            routingEpoch = previous.configuration.keepsRouting(in: configuration) ? previous.routingEpoch : configuration.id
        } else {
            routingEpoch = configuration.id
        }
        var table = [LocalReplica?](repeating: nil, count: RegionID.limit)
        var primaries = [UInt16](repeating: UInt16(NodeID.limit), count: RegionID.limit)
        let backupMasks = UnsafeMutablePointer<UInt64>.allocate(capacity: RegionID.limit)
        backupMasks.initialize(repeating: 0, count: RegionID.limit)
        var allocation: [RegionID] = []
        for placement in configuration.regions {
            primaries[placement.region.index] = placement.primary.rawValue
            for backup in placement.backups { backupMasks[placement.region.index] |= 1 << UInt64(backup.index) }
        }
        for region in regions {
            guard let placement = configuration.placement(of: region.id), placement.replicas.contains(node) else { continue }
            let isPrimary = placement.primary == node
            if let kept = previous?.replicaTable[region.id.index], (kept.allocator != nil) == isPrimary {
                table[region.id.index] = kept
            } else {
                // New here, or promoted from backup to primary: the allocator is rebuilt from the bytes.
                table[region.id.index] = LocalReplica(region: region, isPrimary: isPrimary)
            }
            if isPrimary { allocation.append(region.id) }
        }
        self.replicaTable = table
        // Up to the highest region this node holds, not RegionID.limit: a view is built at every
        // configuration change, recovery's included, and a table for every possible region (over
        // 256 KiB, fresh pages from the kernel each time) cost recovery about half a millisecond of
        // page faults per member.
        let replicaSlots = (table.lastIndex { $0 != nil } ?? -1) + 1
        self.replicaSlots = replicaSlots
        self.replicaAccess = .allocate(capacity: max(1, replicaSlots))
        for index in 0..<replicaSlots { (self.replicaAccess + index).initialize(to: table[index].map(ReplicaAccess.init)) }
        self.primaries = primaries
        self.backupMasks = backupMasks
        self.allocationRegions = allocation.sorted()
        // Senders to former members are kept: their records are refused, but a refusal is still
        // answered so that a stale coordinator learns at once.
        var senders = previous?.senders ?? [ChannelSender?](repeating: nil, count: NodeID.limit)
        var replySenders = previous?.replySenders ?? [ChannelSender?](repeating: nil, count: NodeID.limit)
        var bits: UInt64 = 0
        for member in configuration.members {
            bits |= 1 << UInt64(member.node.index)
            // A client member may not be running yet (over verbs its mailbox answers only while
            // its program runs): its channels assume this node's ring size until they attach.
            let assumed = member.client ? ringCapacity : nil
            senders[member.node.index] = try previous?.senders[member.node.index]
                ?? ChannelSender(transport: transport, to: member.node, assumedRingCapacity: assumed)
            replySenders[member.node.index] = try previous?.replySenders[member.node.index]
                ?? ChannelSender(transport: transport, to: member.node, kind: .messages, assumedRingCapacity: assumed)
            // A member (again): sends to it wait for ring space as usual.
            senders[member.node.index]?.giveUpWaiting(false)
            replySenders[member.node.index]?.giveUpWaiting(false)
        }
        self.senders = senders
        self.replySenders = replySenders
        self.replySenderTable = .allocate(capacity: NodeID.limit)
        self.replySenderTable.initialize(from: replySenders.map { $0.map { Unmanaged.passUnretained($0) } }, count: NodeID.limit)
        self.memberBits = bits
        self.maximumRecordBytes = configuration.members.compactMap { senders[$0.node.index]?.maximumMessage }.min() ?? 0
        self.senderTable = .allocate(capacity: NodeID.limit)
        self.senderTable.initialize(from: senders.map { $0.map { Unmanaged.passUnretained($0) } }, count: NodeID.limit)
    }

    deinit {
        senderTable.deallocate()
        replySenderTable.deallocate()
        backupMasks.deallocate()
        replicaAccess.deinitialize(count: replicaSlots)
        replicaAccess.deallocate()
    }

    /// ``replicaTable`` again, unretained (see ``ReplicaAccess``), for regions 0 up to
    /// ``replicaSlots`` (exclusive): no region above holds a replica here.
    let replicaAccess: UnsafeMutablePointer<ReplicaAccess?>
    let replicaSlots: Int

    /// This node's replica of `region`, unretained, if it holds one.
    @inline(__always) func replica(_ region: RegionID) -> ReplicaAccess? {
        region.index < replicaSlots ? replicaAccess[region.index] : nil
    }

    /// The senders again, unretained, so that sending costs no reference counting.
    let senderTable: UnsafeMutablePointer<Unmanaged<ChannelSender>?>
    /// The reply senders, unretained.
    let replySenderTable: UnsafeMutablePointer<Unmanaged<ChannelSender>?>

    /// The primary of `region`, if the configuration has the region.
    @inline(__always) func primary(of region: RegionID) -> NodeID? {
        guard region.index < RegionID.limit else { return nil }
        let raw = primaries[region.index]
        return raw == UInt16(NodeID.limit) ? nil : NodeID(rawValue: raw)
    }

    /// This node's replica of `region`, if it holds one.
    @inline(__always) func localReplica(_ region: RegionID) -> LocalReplica? {
        region.index < RegionID.limit ? replicaTable[region.index] : nil
    }

    @inline(__always) func isMember(_ node: NodeID) -> Bool { memberBits & (1 << UInt64(node.index)) != 0 }

    /// Whether the channel to `node` looked more than half full when this node last sent on it:
    /// records kept in the receiver's log hold their space until TRUNCATE, so a coordinator then
    /// sends the TRUNCATEs it has pending for that node before adding more.
    @inline(__always) func channelFillsUp(to node: NodeID) -> Bool {
        guard node.index < NodeID.limit, let sender = senderTable[node.index] else { return false }
        return sender._withUnsafeGuaranteedRef { sender in
            // The known head lags: look again at the receiver's progress before flushing.
            sender.bytesInUse > sender.ringCapacity >> 1 && sender.refreshedBytesInUse() > sender.ringCapacity >> 1
        }
    }

    /// Sends `record` to `node`'s mailbox through this configuration's sender; without `waiting`,
    /// only if the ring has room now (else ``TransportError/channelFull(receiver:waitedMilliseconds:)``).
    ///
    /// With `promised` (a commit's LOCK, COMMIT-BACKUP or COMMIT-PRIMARY), the record takes space
    /// that ``promise(_:to:)`` promised it (``ChannelSender/sendPromised(_:waiting:)``).
    func send(_ record: UnsafeRawBufferPointer, to node: NodeID, usingReserve: Bool = false, waiting: Bool = true,
              promised: Bool = false) throws(TransactionError) {
        guard !sendsStopped.load(ordering: .relaxed) else { throw .shutDown(self.node) }
        guard node.index < NodeID.limit, let sender = senderTable[node.index], isMember(node) || configuration.contains(self.node) else {
            throw .invalidAddress(GlobalAddress(rawValue: 0), reason: "node \(node) is not a member of \(configuration.id)")
        }
        let failure: TransportError? = sender._withUnsafeGuaranteedRef { sender in
            do throws(TransportError) {
                if promised {
                    if try !sender.sendPromised(record, waiting: waiting) { return .channelFull(receiver: node, waitedMilliseconds: 0) }
                } else if waiting {
                    try sender.send(record, usingReserve: usingReserve)
                } else if try !sender.trySend(record, usingReserve: usingReserve) {
                    return .channelFull(receiver: node, waitedMilliseconds: 0)
                }
                return nil
            } catch {
                return error
            }
        }
        if let failure { throw .transport(failure) }
    }

    /// Promises `bytes` of `node`'s log to a commit (``ChannelSender/promise(_:)``); false if the
    /// log has no room for them, or `node` has no channel in this configuration.
    @inline(__always) func promise(_ bytes: Int, to node: NodeID) -> Bool {
        guard node.index < NodeID.limit, let sender = senderTable[node.index] else { return false }
        return sender._withUnsafeGuaranteedRef { $0.promise(bytes) }
    }

    /// Gives back `bytes` of a promise made with ``promise(_:to:)``.
    @inline(__always) func releasePromise(_ bytes: Int, to node: NodeID) {
        guard node.index < NodeID.limit, let sender = senderTable[node.index] else { return }
        sender._withUnsafeGuaranteedRef { $0.releasePromise(bytes) }
    }
}

/// A node's transaction engine: coordinator of the transactions started on it, primary and backup of
/// its region replicas, and the poller that serves the records other nodes write into its mailbox.
package final class Engine: Sendable {
    package let node: NodeID
    package let options: EngineOptions
    /// ``EngineOptions/sabotage``, read on the commit path (reading it through `options` would
    /// copy the options and retain their metrics factory).
    let sabotage: ProtocolSabotage?
    /// The current view, as the bits of an unretained reference: read on every record and
    /// transaction without a lock or reference counting.
    private let currentView = Atomic<UInt>(0)
    /// Every view this engine has had, kept alive so that a reader holding the current one's
    /// unretained reference never sees it freed (one per configuration change: a few).
    private let views = Mutex<[ConfigurationView]>([])
    /// Every region file this node holds (replicas in the current configuration or not).
    private let heldRegions: Mutex<[Region]>
    // Hot copies of options (reading `options` copies the whole struct, existential included).
    let readAttempts: Int
    let truncationBatch: Int
    let persistEveryInstall: Bool
    let phaseTimingInterval: UInt64
    let replyTimeoutNanoseconds: UInt64
    package let statistics: EngineStatistics
    let transport: any Transport
    let mailbox: Mailbox
    let allocationCursor = Atomic<Int>(0)
    let replies = ReplySlots()
    let logger: Logger
    /// Committed transactions whose backup records await a TRUNCATE, per backup node.
    let pendingTruncation: TruncationBatches
    let running = Atomic<Bool>(true)
    /// Set by a configuration manager's member service when it starts: a failed peer will be
    /// removed and recovered from, so a transaction that failed on one waits for that and tries
    /// again (``retriesAfterRemoval(after:)``).
    package let recoversFromFailures = Atomic<Bool>(false)
    /// Test-only failures of the commit protocol's sends and reads (see ``injectFaults(_:)``).
    let faults = FaultInjector()
    /// ABORT and COMMIT-PRIMARY records that could not be delivered, retried in order.
    let owed = OutcomePlans()
    /// Closed while transaction-state recovery runs (FaRM's BLOCK step); counts commits in flight.
    let gate = CommitGate()
    /// Who adds a region when this node's regions are full (``supplyRegions(with:)``); its lock
    /// also lets one request at a time through.
    let regionSupplier = Mutex<RegionSupplier?>(nil)
    /// The record processors, one per sender (its lane): the records of node n's log and message
    /// queue here are handled by lane n, under the mailbox's lane claim of n, so lanes of
    /// different senders run on different threads at once (FaRM's parallel record processing:
    /// each thread owns a subset of the node's incoming logs). Every record of a transaction
    /// reaches a node from its coordinator's node, so one lane holds all of a transaction's state
    /// here. Created with the engine, one per possible node id; never replaced.
    /// `nonisolated(unsafe)`: the pointer and its entries are written only in `init` and freed in
    /// `deinit`; each processor is used under its lane's claim (see RecordProcessor).
    nonisolated(unsafe) let lanes: UnsafeMutablePointer<Unmanaged<RecordProcessor>>
    /// Bit n: poll the rings of node n (every node that was ever a member).
    let channelsInUse = Atomic<UInt64>(0)
    /// Bit n: node n was removed, and transaction recovery has taken its votes: its records are
    /// refused even before this node moves to the configuration without it.
    let refusedSenders = Atomic<UInt64>(0)
    /// Moves each time a lane keeps or applies backup entries that allocate (a lane's deferred
    /// entries, which wait for a slab's class, are tried again when it moves).
    let allocationsApplied = Atomic<Int>(0)
    /// The slab classes that allocate entries of COMMIT-BACKUP records kept in any lane here name
    /// (key: region << 40 | slab number): an entry of another lane's transaction waiting for its
    /// slab's class learns it here (``RecordProcessor``'s `learnSlabClass`). Each with one of the
    /// slots named and how many kept records name the slab.
    let keptSlabClasses = Mutex<[UInt64: (slot: ObjectSlot, records: Int)]>([:])
    /// Held while anything installs into this node's backup replicas: a lane applying
    /// COMMIT-BACKUP entries (TRUNCATEs of different coordinators reach different lanes), data
    /// recovery's copy, recovery applying its decisions. Two installs into one object must not run
    /// at once (newest version wins only if each install is whole). See ``withBackupApplyClaim(_:)``.
    let backupApplyClaim = Atomic<Bool>(false)

    /// Runs `body` holding ``backupApplyClaim`` (a spin lock: its holders install a few objects at
    /// a time; after 64 spins the thread yields between tries). Not reentrant.
    @inline(__always) func withBackupApplyClaim<R, E: Error>(_ body: () throws(E) -> R) throws(E) -> R {
        var spins = 0
        while !backupApplyClaim.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged {
            spins += 1
            if spins > 64 { sched_yield() }
        }
        defer { backupApplyClaim.store(false, ordering: .releasing) }
        return try body()
    }
    private let pollerThread = Mutex<pthread_t?>(nil)
    /// Set when a coordinator served this node's mailbox since the poller last looked.
    let helped = Atomic<Bool>(false)
    /// How long the poller sleeps after finding its mailbox served by helpers.
    private let helpedPollerSleepMicroseconds: UInt32 = 200
    /// Engines of the other nodes in this process, which waiting coordinators may help.
    let neighbours = Mutex<[NodeID: Unowned]>([:])

    /// An engine of the same process (unowned: engines do not keep each other alive).
    struct Unowned: @unchecked Sendable {
        // Set once by the cluster that owns both engines and outlives their use.
        unowned(unsafe) let engine: Engine
    }

    /// Builds the engine of `node` over its `replicas` (every region of `configuration` placed on it,
    /// opened) and starts its poller thread.
    package init(node: NodeID, configuration: Configuration, transport: any Transport, mailbox: Mailbox,
                leasePage: Region, replicas: [Region], options: EngineOptions = EngineOptions(), logger: Logger? = nil) throws {
        self.node = node
        self.options = options
        self.readAttempts = options.readAttempts
        self.truncationBatch = options.truncationBatch
        self.pendingTruncation = TruncationBatches(limit: options.truncationBatch)
        self.persistEveryInstall = options.persistEveryInstall
        self.sabotage = options.sabotage
        self.phaseTimingInterval = UInt64(max(1, options.phaseTimingInterval))
        self.replyTimeoutNanoseconds = options.replyTimeout.wholeNanoseconds
        self.transport = transport
        self.mailbox = mailbox
        self.leasePage = leasePage
        self.statistics = EngineStatistics(node: node, factory: options.metricsFactory ?? MetricsSystem.factory)
        self.logger = logger ?? Logger(label: "granary.\(node)")
        for region in replicas {
            guard let placement = configuration.placement(of: region.id), placement.replicas.contains(node) else {
                throw ConfigurationError.invalid("\(node) holds region \(region.id), which the configuration does not place on it")
            }
        }
        self.heldRegions = Mutex(replicas)
        let first = try ConfigurationView(node: node, configuration: configuration, regions: replicas,
                                          previous: nil, transport: transport, ringCapacity: mailbox.ringCapacity)
        self.views.withLock { $0.append(first) }
        self.currentView.store(UInt(bitPattern: Unmanaged.passUnretained(first).toOpaque()), ordering: .releasing)
        self.lanes = .allocate(capacity: NodeID.limit)
        for index in 0..<NodeID.limit { (lanes + index).initialize(to: Unmanaged.passRetained(RecordProcessor())) }
        // Poll the rings of every node that was ever a member (a removed node's records are
        // rejected, not left unread).
        channelsInUse.store(configuration.members.reduce(0) { $0 | 1 << UInt64($1.node.index) }, ordering: .relaxed)
        for index in 0..<NodeID.limit {
            lanes[index].takeUnretainedValue().engine = self  // set before the poller starts; see RecordProcessor
        }
        startPoller()
    }

    /// The configuration this node is in now, with its lookup tables.
    package var view: ConfigurationView { unmanagedView.takeUnretainedValue() }

    var unmanagedView: Unmanaged<ConfigurationView> {
        Unmanaged.fromOpaque(UnsafeRawPointer(bitPattern: currentView.load(ordering: .acquiring))!)
    }

    /// The configuration this node is in now.
    package var configuration: Configuration { view.configuration }

    /// Whether `view` is still this node's current view (one load, no reference counting).
    @inline(__always) func isCurrentView(_ view: Unmanaged<ConfigurationView>) -> Bool {
        currentView.load(ordering: .acquiring) == UInt(bitPattern: view.toOpaque())
    }

    /// Moves this node to `configuration` (NEW-CONFIG), with `newRegions` (files of regions newly
    /// placed on it, already registered with the transport): from now on it rejects records of any
    /// other configuration and from nodes outside it, routes to the new primaries, and serves as
    /// primary the regions it was promoted for (their allocators rebuilt from the replica bytes).
    ///
    /// - Throws: ``ConfigurationError/invalid(_:)`` unless the id is higher than the current one.
    package func apply(_ configuration: Configuration, adding newRegions: [Region] = []) throws {
        let current = view
        let regions = heldRegions.withLock { held in
            held += newRegions.filter { region in !held.contains { $0.id == region.id } }
            return held
        }
        guard configuration.id > current.configuration.id else {
            throw ConfigurationError.invalid("\(node) is in \(current.configuration.id) and cannot move to \(configuration.id)")
        }
        let next = try ConfigurationView(node: node, configuration: configuration, regions: regions, previous: current,
                                         transport: transport, ringCapacity: mailbox.ringCapacity)
        // Regions this node now leads (transaction-state recovery resolved their kept records
        // before a configuration that removes nodes is applied; see TransactionRecovery).
        let promoted = configuration.regions.filter {
            $0.primary == node && current.primary(of: $0.region) != node && current.primary(of: $0.region) != nil
        }.map(\.region)
        let added = configuration.regions.filter { $0.replicas.contains(node) && current.primary(of: $0.region) == nil }.map(\.region)
        channelsInUse.bitwiseOr(next.memberBits, ordering: .relaxed)
        refusedSenders.bitwiseAnd(~next.memberBits, ordering: .relaxed)
        // The mailbox's poll claim (every lane's) keeps every record processor out meanwhile.
        mailbox.withPoller { _ in
            views.withLock { $0.append(next) }
            currentView.store(UInt(bitPattern: Unmanaged.passUnretained(next).toOpaque()), ordering: .releasing)
            mailbox.advanceReleased()
        }
        // Lists joined by hand: an array's own description goes through dynamic casts whose
        // first lookups cost recovery's move about 0.3 ms (perf).
        func list(_ regions: [RegionID]) -> String { "[" + regions.map(\.description).joined(separator: ", ") + "]" }
        let description = "\(node) moved to \(configuration.id): members \(configuration.members.map(\.node.description).joined(separator: ",")), promoted \(list(promoted)), new here \(list(added))"
        if current.configuration.members == configuration.members && promoted.isEmpty {
            // Regions added, a manager or a copy changed: routine, and frequent while a cluster grows.
            logger.debug("\(description)")
        } else {
            logger.info("\(description)")
        }
    }

    /// The largest record this node can send (the smallest channel maximum over its peers): a
    /// transaction's LOCK or COMMIT-BACKUP record to one node must fit.
    package var maximumRecordBytes: Int { view.maximumRecordBytes }

    /// Sends `record` to `node`'s mailbox.
    func send(_ record: UnsafeRawBufferPointer, to node: NodeID, usingReserve: Bool = false, waiting: Bool = true) throws(TransactionError) {
        let failure: TransactionError? = unmanagedView._withUnsafeGuaranteedRef { view in
            do throws(TransactionError) {
                try view.send(record, to: node, usingReserve: usingReserve, waiting: waiting)
                return nil
            } catch {
                return error
            }
        }
        if let failure { throw failure }
    }

    /// Whether a commit waiting on `nodes` (a bit per node: for LOCK answers, or for room in their
    /// logs) must stop waiting: one of them is being removed, a recovery waits for the commits in
    /// flight to end, or this engine stops. The commit then starts again once commits do.
    @inline(__always) func mustStopWaiting(on nodes: UInt64) -> Bool {
        gate.removing.load(ordering: .relaxed) & nodes != 0 || gate.isRecovering || !running.load(ordering: .relaxed)
    }

    // MARK: Poller

    private final class ThreadStart: @unchecked Sendable {
        // Handed to exactly one new thread.
        let engine: Engine
        init(_ engine: Engine) { self.engine = engine }
    }

    private func startPoller() {
        var thread = pthread_t()
        let start = Unmanaged.passRetained(ThreadStart(self)).toOpaque()
        let result = pthread_create(&thread, nil, { raw in
            let start = Unmanaged<ThreadStart>.fromOpaque(raw!).takeRetainedValue()
            start.engine.pollLoop()
            return nil
        }, start)
        precondition(result == 0, "pthread_create failed for the poller of \(node): \(result)")
        pollerThread.withLock { $0 = thread }
    }

    private func pollLoop() {
        // Coordinators of this process help while they wait, so the poller mostly keeps the node
        // live for peers elsewhere: it spins briefly, then sleeps rather than competing for the CPU.
        // While helpers are serving the mailbox, it stays out of their way longer still.
        var backoff = Backoff(spins: 8, yields: options.pollerYields, maximumSleepMicroseconds: options.pollerMaximumSleepMicroseconds)
        var lastCheck = monotonicNanoseconds()
        while running.load(ordering: .acquiring) {
            let handled = pollOnce()
            // Every 10 ms: is each channel of this node still attached to its receiver's ring? A
            // receiver that restarted, or refused bytes it could not read, reopened it; until this
            // node attaches again, what it sends there is lost. One load per channel (one read on verbs).
            let now = monotonicNanoseconds()
            if now &- lastCheck > 10_000_000 {
                lastCheck = now
                unmanagedView._withUnsafeGuaranteedRef { view in checkConnections(to: view.memberBits, view: view) }
                // Records a coordinator owes (an ABORT or COMMIT-PRIMARY whose send failed) go out
                // from here too: the locks they release may be what every coordinator waits on.
                // Not while recovery runs: it decides those transactions, and no record of the old
                // configuration may be sent once this node has said it sends no more.
                if owed.count.load(ordering: .relaxed) > 0, !gate.isClosed { resolveOwedRecords(waiting: false) }
            }
            // Load before clearing: an exchange would write the flag's line on every loop.
            if helped.load(ordering: .relaxed), helped.exchange(false, ordering: .relaxed) {
                // Coordinators are serving this mailbox: what is left, they serve next.
                usleep(helpedPollerSleepMicroseconds)
            } else if handled > 0 {
                backoff.reset()
            } else {
                backoff.pause()
            }
        }
    }

    /// Checks this node's channels to `nodes` (bit n: node n), attaching again those whose rings
    /// were reopened, without waiting: a node whose ring towards us was reopened may have
    /// restarted with a fresh mailbox; a coordinator whose LOCK went unanswered may be writing
    /// into a ring its receiver reopened. One read per channel.
    func checkConnections(to nodes: UInt64, view: ConfigurationView) {
        for node in NodeMask(nodes) {
            for channel in [view.senders[node.index], view.replySenders[node.index]] {
                guard let channel else { continue }
                do {
                    if try !channel.checkConnection(wait: false) {
                        logger.info("the \(channel.kind == .log ? "log" : "message queue") to \(node) is being reopened for this node")
                    }
                } catch {
                    logger.info("could not check the channel to \(node): \(error)")
                }
            }
        }
    }

    /// Microseconds every round of record processing waits first (``slowRecordProcessing(microseconds:)``).
    let processingDelay = Atomic<UInt32>(0)

    /// Slows this node's record processing: each round of polling its mailbox waits
    /// `microseconds` first (0: normal). A fault for `granary check run --nemesis slow`.
    package func slowRecordProcessing(microseconds: UInt32) { processingDelay.store(microseconds, ordering: .relaxed) }

    /// Set while record processing is paused (``pauseRecordProcessing(_:)``).
    let processingPaused = Atomic<Bool>(false)

    /// Pauses this node's record processing (true) or resumes it (false), as SIGSTOP and SIGCONT
    /// would a node process's: nobody serves its mailbox meanwhile, neither its poller nor
    /// coordinators helping; its lease thread goes on. For tests of waits on a paused peer.
    /// Pausing returns once no record is being processed: it takes every lane's claim after
    /// setting the flag, and a poll reads the flag again under each lane's claim, so a record sent
    /// after this returns stays unprocessed. (A poll that had read the flag only at its start
    /// answered a LOCK sent right after the pause now and then: the cancelled-transaction test saw
    /// its write committed.)
    package func pauseRecordProcessing(_ paused: Bool) {
        processingPaused.store(paused, ordering: .sequentiallyConsistent)
        if paused { mailbox.withPoller { _ in } }
    }

    /// The bytes of the logs this node sends to that its commits have promised to themselves now
    /// (``ChannelSender/promisedBytes``, summed): 0 once no commit is under way.
    package var promisedLogBytes: Int { view.senders.reduce(0) { $0 + ($1?.promisedBytes ?? 0) } }

    /// Lets coordinators on this engine help the engines of `peers` (nodes of the same process).
    package func helpNeighbours(_ peers: [Engine]) {
        neighbours.withLock { table in
            for peer in peers where peer !== self { table[peer.node] = Unowned(engine: peer) }
        }
    }

    /// Stops this node as SIGKILL would, for tests and benchmarks of recovery: its poller stops
    /// after the record at hand, no coordinator of it sends another record (a commit in progress
    /// fails at its next send), nothing is flushed, and its mailbox is served no more; its region
    /// files and mappings stay, as a killed process's files do.
    package func crash() {
        for view in views.withLock({ $0 }) { view.sendsStopped.store(true, ordering: .relaxed) }
        stop()
    }

    /// Whether the node is serving (not stopped or crashed).
    package var isRunning: Bool { running.load(ordering: .relaxed) }

    /// Stops the poller thread (after it finishes the record at hand).
    package func stop() {
        guard running.exchange(false, ordering: .acquiringAndReleasing) else { return }
        if let thread = pollerThread.withLock({ $0 }) { pthread_join(thread, nil) }
    }

    deinit {
        stop()
        for index in 0..<NodeID.limit { lanes[index].release() }
        lanes.deinitialize(count: NodeID.limit)
        lanes.deallocate()
    }

    // MARK: Quiescence

    /// Sends every pending TRUNCATE to `node` now (a channel to it fills up with kept records).
    func flushTruncations(to node: NodeID) {
        let ids = pendingTruncation.take(for: node)
        if !ids.isEmpty { _ = ids.withUnsafeBufferPointer { sendTruncateOrKeep($0, to: node) } }
    }

    /// Sends every pending TRUNCATE now.
    package func flushTruncations() throws(TransactionError) {
        resolveOwedRecords()
        var failure: TransactionError?
        for (node, ids) in pendingTruncation.takeAll() {
            if let error = ids.withUnsafeBufferPointer({ sendTruncateOrKeep($0, to: node) }), failure == nil { failure = error }
        }
        if let failure { throw failure }
    }

    /// Whether this node has no record waiting in its mailbox, no lock held for a coordinator and no
    /// backup record waiting for truncation.
    package var isQuiescent: Bool {
        sumOverLanes { $0.pendingCount.load(ordering: .acquiring) } == 0
            && sumOverLanes { $0.unsentCount.load(ordering: .relaxed) } == 0
            && sumOverLanes { $0.stashedCount.load(ordering: .acquiring) } == 0
            && (0..<NodeID.limit).allSatisfy { index in
                channelsInUse.load(ordering: .relaxed) & (1 << UInt64(index)) == 0
                    || (mailbox.isEmpty(from: NodeID(index)) && mailbox.isEmpty(from: NodeID(index), kind: .messages))
            }
    }

    /// This node's channels and record processor as they are now, for the report of a peer that
    /// did not answer.
    package var channelReport: String {
        let view = self.view
        let poller = pollerThread.withLock { $0 }.map { "0x" + String(UInt($0), radix: 16) } ?? "none"
        var lines = ["\(node) (poller thread \(poller)): pending locks \(sumOverLanes { $0.pendingCount.load(ordering: .relaxed) }), unsent replies \(sumOverLanes { $0.unsentCount.load(ordering: .relaxed) }), stashed \(sumOverLanes { $0.stashedCount.load(ordering: .relaxed) })"]
        for index in 0..<NodeID.limit where channelsInUse.load(ordering: .relaxed) & (1 << UInt64(index)) != 0 {
            lines.append("  in:  " + mailbox.ringState(from: NodeID(index)))
        }
        for index in 0..<NodeID.limit where channelsInUse.load(ordering: .relaxed) & (1 << UInt64(index)) != 0 {
            lines.append("  in:  " + mailbox.ringState(from: NodeID(index), kind: .messages))
        }
        for sender in view.senders.compactMap({ $0 }) { lines.append("  out: log " + sender.sendState) }
        for sender in view.replySenders.compactMap({ $0 }) { lines.append("  out: queue " + sender.sendState) }
        return lines.joined(separator: "\n")
    }

    /// This node's mailbox region.
    package var mailboxRegion: Region { mailbox.region }

    /// This node's lease page (registered with the transport; the membership's lease words, laid
    /// out by ``LeaseWords``).
    package let leasePage: Region

    /// The lease word at `offset` (one of ``LeaseWords``' offsets) in this node's lease page.
    @inline(__always) package func leaseWord(at offset: Int) -> UnsafeMutablePointer<Atomic<UInt64>> {
        (leasePage.base + offset).assumingMemoryBound(to: Atomic<UInt64>.self)
    }

    /// The CM's grant word in this node's lease page: its value changes at every lease the CM grants.
    @inline(__always) package var leaseGrantWord: UnsafeMutablePointer<Atomic<UInt64>> { leaseWord(at: LeaseWords.grantOffset) }

    /// The transport this engine uses.
    package var transportHandle: any Transport { transport }

    /// This node's replica of `region`, if it holds one (for inspection and tests).
    package func replica(of region: RegionID) -> Region? { view.localReplica(region)?.region }

    /// The allocator's counts for `region`, where this node is its primary.
    package func allocatorStatistics(of region: RegionID) -> (allocated: Int, reserved: Int, free: Int, unusedSlabs: Int)? {
        view.localReplica(region)?.allocator?.statistics
    }
}

/// Committed transactions whose backup records await a TRUNCATE, per backup node, batched per
/// thread: a coordinator adds to the shard its thread id hashes to (16 shards, each behind its own
/// lock on cache lines of its own), so coordinators on different cores do not pass one lock's
/// line back and forth on every commit. TRUNCATE is lazy; which batch a transaction rides in does
/// not matter.
final class TruncationBatches: Sendable {
    /// One thread shard's batches: for each node a fixed array of up to `2 * limit` ids (a batch
    /// reaches `limit`, and the thread that filled it takes it at once), plus the ids of batches
    /// whose TRUNCATE could not be sent, kept for the next flush. No allocation per transaction.
    private struct Batches: ~Copyable {
        let capacity: Int
        let ids: UnsafeMutablePointer<TransactionID>
        var counts: UnsafeMutablePointer<Int>
        var putBack: [[TransactionID]] = []

        init(capacity: Int) {
            self.capacity = capacity
            ids = .allocate(capacity: capacity * NodeID.limit)
            counts = .allocate(capacity: NodeID.limit)
            counts.initialize(repeating: 0, count: NodeID.limit)
        }

        deinit {
            ids.deallocate()
            counts.deallocate()
        }

        /// Moves every id kept for `node` (its array and any put back) into `out`.
        mutating func drain(_ node: Int, into out: inout [TransactionID]) {
            if counts[node] > 0 {
                out.append(contentsOf: UnsafeBufferPointer(start: ids + node * capacity, count: counts[node]))
                counts[node] = 0
            }
            if !putBack.isEmpty, !putBack[node].isEmpty {
                out += putBack[node]
                putBack[node].removeAll()
            }
        }
    }

    private final class Shard: Sendable {
        let batches: Mutex<Batches>
        // Keeps neighbouring shards' locks off each other's cache line.
        private let padding: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) =
            (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        init(capacity: Int) { batches = Mutex(Batches(capacity: capacity)) }
    }
    /// The address of the `threadShards` shards, each retained once here (released in deinit):
    /// a commit reaches its thread's shard with no reference counting (an array subscript of a
    /// class retains and releases it, on every transaction).
    private let shardReferences: UInt
    /// Transactions per TRUNCATE record.
    let limit: Int

    init(limit: Int) {
        self.limit = max(1, limit)
        let references = UnsafeMutablePointer<Unmanaged<Shard>>.allocate(capacity: threadShards)
        for index in 0..<threadShards { (references + index).initialize(to: .passRetained(Shard(capacity: 2 * self.limit))) }
        shardReferences = UInt(bitPattern: references)
    }

    deinit {
        let references = UnsafeMutablePointer<Unmanaged<Shard>>(bitPattern: shardReferences)!
        for index in 0..<threadShards { references[index].release() }
        references.deallocate()
    }

    /// Shard `index`'s batches, under its lock.
    @inline(__always)
    private func withBatches<R: Sendable>(ofShard index: Int, _ body: (inout sending Batches) -> R) -> R {
        UnsafeMutablePointer<Unmanaged<Shard>>(bitPattern: shardReferences).unsafelyUnwrapped[index]
            ._withUnsafeGuaranteedRef { shard in shard.batches.withLock { body(&$0) } }
    }

    /// The calling thread's shard's batches, under its lock.
    @inline(__always)
    private func withThreadBatches<R: Sendable>(_ body: (inout sending Batches) -> R) -> R {
        withBatches(ofShard: threadShard(), body)
    }

    /// Puts `ids` (a batch whose TRUNCATE could not be sent) back into the calling thread's shard
    /// for `node`, to go with the next flush.
    func putBack(_ ids: UnsafeBufferPointer<TransactionID>, for node: NodeID) {
        withThreadBatches { batches in
            if batches.putBack.isEmpty { batches.putBack = Array(repeating: [], count: NodeID.limit) }
            batches.putBack[node.index].append(contentsOf: ids)
        }
    }

    /// Adds `id` to the calling thread's batch for each node of `nodes` (a bit per node), under
    /// one lock; returns the nodes whose batches reached ``limit`` (take them with
    /// ``takeFullBatch(for:into:)``).
    @inline(__always)
    func add(_ id: TransactionID, for nodes: UInt64) -> UInt64 {
        withThreadBatches { batches in
            var full: UInt64 = 0
            for node in NodeMask(nodes) {
                let count = batches.counts[node.index]
                if count < batches.capacity {
                    (batches.ids + node.index * batches.capacity + count).initialize(to: id)
                    batches.counts[node.index] = count + 1
                } else {
                    // Every slot taken (batches filled faster than their threads took them): kept
                    // with the put-back ids, for the next flush.
                    if batches.putBack.isEmpty { batches.putBack = Array(repeating: [], count: NodeID.limit) }
                    batches.putBack[node.index].append(id)
                }
                if count + 1 >= self.limit { full |= 1 << UInt64(node.index) }
            }
            return full
        }
    }

    /// Moves up to ``limit`` ids of the calling thread's batch for `node` into `buffer` (of at
    /// least ``limit`` ids) and returns how many.
    func takeFullBatch(for node: NodeID, into buffer: UnsafeMutablePointer<TransactionID>) -> Int {
        // The caller's buffer, passed by address: it only receives a copy of the ids, and nothing
        // of the shard escapes the lock.
        let destination = UInt(bitPattern: buffer)
        return withThreadBatches { batches in
            let count = min(batches.counts[node.index], self.limit)
            let base = batches.ids + node.index * batches.capacity
            UnsafeMutablePointer<TransactionID>(bitPattern: destination)!.update(from: base, count: count)
            let rest = batches.counts[node.index] - count
            if rest > 0 { base.update(from: base + count, count: rest) }
            batches.counts[node.index] = rest
            return count
        }
    }

    /// Takes every thread's batch for `node`.
    func take(for node: NodeID) -> [TransactionID] {
        var out: [TransactionID] = []
        for index in 0..<threadShards {
            withBatches(ofShard: index) { batches in batches.drain(node.index, into: &out) }
        }
        return out
    }

    /// Takes every batch, of every thread, per backup node.
    func takeAll() -> [(NodeID, [TransactionID])] {
        var out: [(NodeID, [TransactionID])] = []
        for index in 0..<NodeID.limit {
            let ids = take(for: NodeID(index))
            if !ids.isEmpty { out.append((NodeID(index), ids)) }
        }
        return out
    }
}
