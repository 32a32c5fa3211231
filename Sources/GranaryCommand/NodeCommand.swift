import ArgumentParser
import Foundation
import Granary
import GranaryVerbs
import GranaryZooKeeper
import Logging
import Metrics
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Set by SIGTERM or SIGINT: a member leaves the configuration and exits.
let terminationRequested = Atomic<Bool>(false)

/// `granary node`: one node process.
///
/// With `--config`, a member of a cluster: it opens its replicas and mailbox, runs the transaction
/// engine (primary and backup of its replicas, coordinator of the transactions it starts) and
/// serves until killed. Without, a bare transport node for transport tests: it owns the regions
/// named by `--regions` in `--directory` and echoes the messages its peers send it.
///
/// Hidden test options: `--bank-accounts` and `--bank-transfers` run the bank test workload from a
/// member: it allocates its accounts (their addresses go to bank-accounts.txt in its directory,
/// then `accounts N` is printed), waits for every other member's accounts, runs the transfers and
/// prints `done N` (or `transfer-refused ERROR` and stops transferring when a transfer cannot
/// commit, e.g. after the node was removed from the configuration).
struct NodeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "node",
        abstract: "Run one node process.",
        discussion: """
            Prints `ready <node> <cluster> <regions>` on standard output once its regions and mailbox \
            exist, then serves until killed.
            With --config FILE (a cluster configuration in JSON, as `Cluster.local` writes to its \
            cluster.json) the node runs the transaction engine, and with --coordination \
            zookeeper://host:port the configuration manager: a failed member is recovered from, and a \
            member restarted with its region directory rejoins. --static runs without it.
            Without --config it is a transport-only node: each message a peer sends it is echoed \
            back, prefixed with "echo:".
            """
    )

    @Option(name: .long, help: "This node's id (0..<\(NodeID.limit)).")
    var id: Int

    @Option(name: .long, help: "The cluster configuration (JSON) this node is a member of.")
    var config: String?

    @Option(name: .long, help: "With --config: agree on configurations through this ZooKeeper ensemble (zookeeper://host:port) and run the configuration manager: failure detection, recovery, rejoin. A member needs this, the cluster file's coordination field, or --static.")
    var coordination: String?

    @Flag(name: .customLong("static"),
          help: "With --config: run on the configuration file alone, without a configuration manager: a node that fails is never recovered (its locks stay held) and nothing rejoins. For tests and benchmarks without ZooKeeper.")
    var staticConfiguration = false

    @Option(name: .long, help: "With a coordination store: the lease between the configuration manager and each node, in milliseconds (default: the cluster file's leaseMilliseconds, else 10).")
    var leaseMs: Int?

    @Flag(name: .long, inversion: .prefixedNo,
          help: "With --coordination: once removed from the configuration (it hung past its lease, or lost its store session), start again and rejoin as a new member.")
    var rejoin = true

    @Option(name: .long, help: ArgumentHelp("Bank workload: accounts this node allocates (with --config).", visibility: .hidden))
    var bankAccounts: Int = 0

    @Option(name: .long, help: ArgumentHelp("Bank workload: transfers this node runs over all members' accounts (with --config).", visibility: .hidden))
    var bankTransfers: Int = 0

    @Option(name: .long, help: ArgumentHelp("Bank workload: pause between transfers, in microseconds.", visibility: .hidden))
    var bankPauseMicroseconds: UInt32 = 0

    @Option(name: .long, help: ArgumentHelp("Bank workload: start the transfers only once this file exists (a driver's go signal).", visibility: .hidden))
    var bankStartFile: String?

    @Option(name: .long, help: ArgumentHelp("Bank workload: initial balance of each account.", visibility: .hidden))
    var bankBalance: Int64 = 1_000

    @Option(help: "Times an idle poller yields the CPU before it sleeps (0: sleep at once). Other processes' coordinators wait for this node's poller: yielding takes their records without a sleep's delay.")
    var pollerYields: UInt32 = 1_000
    @Option(name: .long, help: ArgumentHelp("Bank workload: every N transfers, print `acked M` (transfers that moved money, each counted in this node's counter object in bank-counter.txt) and `audit TOTAL MIN` from a read-only transaction over every account.", visibility: .hidden))
    var bankReportEvery: Int = 0

    @Option(name: .long, help: ArgumentHelp("Bank workload: stop transferring once this file exists.", visibility: .hidden))
    var bankStopFile: String?

    @Option(name: .long, help: "Transport-only node: its region directory (created if missing).")
    var directory: String?

    @Option(name: .long, help: "Transport-only node: the cluster id, in hex, stamped into and checked in every region file.")
    var cluster: String?

    @Option(name: .long, help: "Transport: shm (shared memory on this host) or verbs (RDMA; with --config). Default: the one the node's endpoint in --config names (verbs: or verbs://), else shm.")
    var transport: TransportChoice?

    @Option(name: .long, help: "With --transport verbs: the RDMA device (default: GRANARY_RDMA_DEVICE, else the first).")
    var device: String?

    @Option(name: .long, help: "Data regions to create: ids, comma-separated (existing files are opened, never re-created).")
    var regions: String = ""

    @Option(name: .long, help: "Size of each new data region in bytes (a power of two).")
    var regionSize: Int = 1 << 20

    @Option(name: .long, help: "A peer as ID=DIRECTORY; repeatable.")
    var peer: [String] = []

    @Option(name: .long, help: "With --config: serve Prometheus metrics (committed and aborted transactions, rejected records, protocol phases in seconds, membership events) at http://ADDRESS:PORT/metrics; 0 picks a free port, printed as `metrics PORT`.")
    var metricsPort: Int?

    @Option(name: .long, help: "With --metrics-port: the IPv4 address to listen on.")
    var metricsAddress: String = "127.0.0.1"

    @Option(name: .long, help: "Log level: trace, debug, info, notice, warning, error or critical.")
    var logLevel: LogLevelChoice = .info

    @Flag(name: .long, help: ArgumentHelp("With --coordination (set by `granary cluster up`): the cluster stopped as a whole and restart recovery ran over every node's log; start as the member the stored configuration lists, over the region files as they are, instead of waiting for the removal of a former self.", visibility: .hidden))
    var recovered = false

    @Option(name: .long, help: "With --config: write this process's id to this file (as `granary cluster up` does, for `cluster down`); the node then runs in the background and ignores SIGHUP.")
    var pidFile: String?

    func validate() throws {
        guard (0..<NodeID.limit).contains(id) else { throw ValidationError("--id must be in 0..<\(NodeID.limit), got \(id)") }
        if let metricsPort, !(0...65535).contains(metricsPort) {
            throw ValidationError("--metrics-port must be in 0...65535 (0: any free port), got \(metricsPort)")
        }
        if let leaseMs, !(1...60_000).contains(leaseMs) { throw ValidationError("--lease-ms must be in 1...60000, got \(leaseMs)") }
        if staticConfiguration, coordination != nil { throw ValidationError("--static and --coordination exclude each other") }
        if let coordination {
            guard config != nil else { throw ValidationError("--coordination needs --config") }
            guard case .zookeeper? = CoordinationChoice(coordination) else {
                throw ValidationError("--coordination takes zookeeper://host:port for a node process, got '\(coordination)'")
            }
        }
        if config == nil {
            guard directory != nil, let cluster else { throw ValidationError("give --config FILE, or --directory and --cluster") }
            guard UInt64(cluster, radix: 16) != nil else { throw ValidationError("--cluster must be a hex number, got '\(cluster)'") }
        }
        guard transport != .verbs || config != nil else {
            throw ValidationError("--transport verbs needs --config")
        }
        if device != nil, transport == .shm { throw ValidationError("--device needs --transport verbs") }
        for entry in peer where entry.split(separator: "=", maxSplits: 1).count != 2 || Int(entry.split(separator: "=")[0]) == nil {
            throw ValidationError("--peer takes ID=DIRECTORY, got '\(entry)'")
        }
    }

    /// The transport: `--transport`, else the one `member`'s endpoint names.
    func transportOf(_ member: Member) -> TransportChoice {
        if let transport { return transport }
        return MemberEndpoint(member.endpoint)?.isVerbs == true ? .verbs : .shm
    }

    func run() async throws {
        if let config { return try await runMember(configurationFile: config) }
        let node = NodeID(id)
        let clusterID = ClusterID(rawValue: UInt64(cluster!, radix: 16)!)
        let home = try RegionDirectory(FilePath(directory!))
        let shm = SharedMemoryTransport(localNode: node, cluster: clusterID, directory: home)
        var owned: [Region] = []
        for field in regions.split(separator: ",") {
            guard let number = Int(field), (0..<RegionID.limit).contains(number) else {
                throw ValidationError("--regions takes region ids in 0..<\(RegionID.limit), got '\(field)'")
            }
            let id = RegionID(number)
            let region = try home.openOrCreate(id, size: regionSize, cluster: clusterID)
            try shm.register(region)
            owned.append(region)
        }
        let mailbox = try Mailbox(node: node, directory: home, cluster: clusterID)
        try shm.register(mailbox.region)
        var peers: [NodeID] = []
        for entry in peer {
            let parts = entry.split(separator: "=", maxSplits: 1)
            let peerID = NodeID(Int(parts[0])!)
            shm.addPeer(peerID, endpoint: try RegionDirectory(FilePath(String(parts[1])), create: false))
            peers.append(peerID)
        }
        print("ready \(node) \(clusterID) \(owned.map(\.id.description).joined(separator: ","))")
        fflush(nil)

        var senders: [NodeID: ChannelSender] = [:]
        var backoff = Backoff()
        let reply = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 << 10, alignment: 8)
        defer { reply.deallocate() }
        while true {
            var handled = 0
            for from in peers {
                handled += try mailbox.receiver(from: from).poll { message in
                    let prefix = Array("echo:".utf8)
                    let length = min(prefix.count + message.count, reply.count)
                    reply.copyBytes(from: prefix)
                    UnsafeMutableRawBufferPointer(rebasing: reply[prefix.count..<length])
                        .copyMemory(from: UnsafeRawBufferPointer(rebasing: message[0..<(length - prefix.count)]))
                    if senders[from] == nil { senders[from] = try ChannelSender(transport: shm, to: from) }
                    try senders[from]!.send(UnsafeRawBufferPointer(rebasing: reply[0..<length]))
                }
            }
            if handled > 0 { backoff.reset() } else { backoff.pause() }
        }
    }
}

/// `--log-level`.
enum LogLevelChoice: String, ExpressibleByArgument, CaseIterable {
    case trace, debug, info, notice, warning, error, critical
    var level: Logger.Level { Logger.Level(rawValue: rawValue)! }
}

extension NodeCommand {
    /// Membership events as metrics: a counter per kind, and the configuration id as a gauge.
    static func count(_ event: MembershipEvent, node: NodeID) {
        let kind: String, id: ConfigurationID
        switch event {
        case .becameManager(let configuration): (kind, id) = ("became_manager", configuration)
        case .configurationApplied(let configuration): (kind, id) = ("configuration_applied", configuration)
        case .removed(_, let configuration): (kind, id) = ("removed_member", configuration)
        case .mustRejoin(let configuration): (kind, id) = ("must_rejoin", configuration)
        }
        Counter(label: "granary_membership_events_total", dimensions: [("node", "\(node)"), ("event", kind)]).increment()
        Gauge(label: "granary_configuration_id", dimensions: [("node", "\(node)")]).record(Double(id.rawValue))
    }

    /// A cluster member running the transaction engine.
    func runMember(configurationFile: String) async throws {
        // A process that started again to rejoin says so first, so that its log shows whether
        // the new image ran at all.
        if let rejoinOf = getenv("GRANARY_REJOIN_EXEC") {
            print("started again to rejoin (process \(getpid()), last in configuration \(String(cString: rejoinOf)))")
            fflush(nil)
            unsetenv("GRANARY_REJOIN_EXEC")
        }
        // SIGTERM and SIGINT ask the node to leave and exit (handled in the main loop below).
        let signals = [SIGTERM, SIGINT].map { number in
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler { terminationRequested.store(true, ordering: .releasing) }
            source.resume()
            return source
        }
        defer { signals.forEach { $0.cancel() } }
        if let pidFile {
            // A background node: the terminal that started `cluster up` may hang up.
            signal(SIGHUP, SIG_IGN)
            do {
                try "\(getpid())\n".write(toFile: pidFile, atomically: true, encoding: .utf8)
            } catch {
                throw CommandFailure("cannot write the pid file \(pidFile): \(error.localizedDescription)")
            }
        }
        let clusterFile = try ClusterFile.load(configurationFile)
        // Endpoints with relative directories (as `granary cluster init` and `Cluster.local`
        // write them) are relative to the file's directory, wherever the node is started from.
        let fileDirectory = FilePath(URL(fileURLWithPath: configurationFile).deletingLastPathComponent().path)
        let configuration = Cluster.resolvingEndpoints(of: clusterFile.configuration, against: fileDirectory)
        try configuration.validate()
        // The coordination store: --coordination, else the file's (unless --static).
        let coordination = self.coordination ?? (staticConfiguration ? nil : clusterFile.coordination)
        guard coordination != nil || staticConfiguration else {
            throw CommandFailure("""
                a member runs the configuration manager through ZooKeeper: give --coordination zookeeper://host:port \
                (or name it in \(configurationFile) as "coordination") for recovery from failures and rejoin, or --static \
                to run on the configuration file alone (no recovery)
                """)
        }
        let leaseMs = self.leaseMs ?? clusterFile.leaseMilliseconds ?? 10
        let node = NodeID(id)
        guard let me = configuration.members.first(where: { $0.node == node }) else {
            throw CommandFailure("\(node) is not a member in \(configurationFile)")
        }
        if configuration.clients.contains(node) {
            throw CommandFailure("\(node) holds no region in \(configurationFile): it is a client member; run transactions as it with `granary bench WORKLOAD --cluster \(configurationFile)` or Cluster.connect(file:) in a program")
        }
        let home = try NodeStorage.directory(of: me)
        // With a coordination store, the node starts from the configuration the store holds: as
        // the member it lists, or, when it lists this node no more (or this is a restart, whose
        // former self the CM must remove first), as a node that joins (REJOIN).
        var start = configuration
        var joining = false
        var resuming = false
        var store: ZooKeeperStore?
        if let coordination, case .zookeeper(let address) = CoordinationChoice(coordination) {
            let zooKeeper = try ZooKeeperStore(connectString: address, sessionTimeout: .seconds(4))
            store = zooKeeper
            try await ConfigurationRecord.bootstrap(configuration.withoutClients, in: zooKeeper)
            let restarted = FileManager.default.fileExists(atPath: home.path(for: .mailbox(of: node)).string)
            var (stored, _) = try await ConfigurationRecord.read(configuration.cluster, from: zooKeeper)
            if restarted && stored.contains(node) && recovered {
                // The whole cluster stopped and was recovered (`cluster up`): this node is the
                // member the store lists, its files are its replicas.
                resuming = true
            } else if restarted && stored.contains(node) {
                print("waiting-removal \(stored.id.rawValue)")
                fflush(nil)
                stored = try await ConfigurationRecord.waitForRemoval(of: node, from: stored, in: zooKeeper)
            }
            if !stored.contains(node) {
                joining = true
                // Its old replicas are superseded (the members recovered without it and hold every
                // committed write): regions placed on it later start from empty files that data
                // recovery fills from their primaries.
                home.setAsideRegions()
                stored.members.append(me)
            }
            start = stored
        }
        // A node started again over its files because its cluster stopped as a whole (static, or
        // coordinated and `--recovered`) opens them strictly (a missing region file is an error,
        // never a new empty region) and must find its log empty: records kept from before the
        // stop are decided by restart recovery over every node's log, which `granary cluster up`
        // runs before it starts the nodes.
        let reopened = resuming || store == nil && FileManager.default.fileExists(atPath: home.path(for: .mailbox(of: node)).string)
        let storage = try NodeStorage(node: node, configuration: start,
                                      transport: transportOf(me) == .verbs ? .verbs(device: device) : .sharedMemory,
                                      ringCapacity: Self.ringCapacity, preservingLog: reopened, reopening: reopened)
        if reopened {
            let kept = storage.keptRecords
            guard kept == 0 else {
                throw CommandFailure("\(node)'s log in \(home.path) holds \(kept) records from before the cluster stopped: "
                    + "they are decided with every other node's log before any node serves; start the whole cluster with "
                    + "`granary cluster up --directory DIR`, which recovers them first")
            }
            storage.mailbox.resetRings()
        }
        try storage.waitForPeers(timeout: .seconds(60))
        // Metrics before the engine: it makes its counters and timers from the process's factory.
        if let metricsPort {
            let endpoint = try MetricsEndpoint(address: metricsAddress, port: UInt16(metricsPort))
            print("metrics \(endpoint.port)")
            fflush(nil)
        }
        var logger = Logger(label: "granary.\(node)")
        logger.logLevel = logLevel.level
        var options = EngineOptions()
        options.maximumAttempts = 100_000
        options.pollerYields = pollerYields
        let engine = try storage.makeEngine(options: options, logger: logger)
        print("ready \(node) \(configuration.cluster) \(storage.replicas.map(\.id.description).joined(separator: ","))")
        fflush(nil)
        var membership: MembershipService?
        var events: Task<Void, Never>?
        if let store {
            var options = MembershipOptions()
            options.lease = .milliseconds(leaseMs)
            let size = configuration.regionSize, regionLogger = logger
            let service = MembershipService(
                engine: engine, store: store, options: options, logger: logger,
                connect: { member in try storage.connect(member) },
                openRegion: { placement in
                    try storage.openRegionWhileServing(placement, size: size, logger: regionLogger)
                })
            membership = service
            storage.spares.start(count: options.spareRegions, logger: logger)
            try await service.start(joining: joining)
            // Membership events on standard output, one line each, for operators and tests.
            events = Task.detached {
                for await event in service.events {
                    switch event {
                    case .becameManager(let id): print("manager \(id.rawValue)")
                    case .configurationApplied(let id): print("configuration \(id.rawValue)")
                    case .removed(let node, let id): print("removed \(node) \(id.rawValue)")
                    case .mustRejoin(let id): print("must-rejoin \(id.rawValue)")
                    }
                    Self.count(event, node: node)
                    fflush(nil)
                }
            }
        }
        // The bank workload runs in a node's first life only: a joiner's accounts are long allocated.
        if bankAccounts > 0 && !joining {
            var mine: [GlobalAddress] = []
            while mine.count < bankAccounts {
                let batch = min(200, bankAccounts - mine.count)
                let balance = bankBalance
                mine += try engine.run { tx in try (0..<batch).map { _ in try tx.allocate(balance) } }
            }
            let counter = try engine.run { tx in try tx.allocate(Int64(0)) }
            try (String(counter.rawValue, radix: 16) + "\n").write(toFile: home.path.appending("bank-counter.txt").string,
                                                                  atomically: true, encoding: .utf8)
            let list = mine.map { String($0.rawValue, radix: 16) }.joined(separator: "\n") + "\n"
            let path = home.path.appending("bank-accounts.txt").string
            try list.write(toFile: path + ".tmp", atomically: false, encoding: .utf8)
            rename(path + ".tmp", path)
            print("accounts \(mine.count)")
            fflush(nil)
        }
        if bankTransfers > 0 && !joining {
            if let bankStartFile {
                while !FileManager.default.fileExists(atPath: bankStartFile) { try await Task.sleep(for: .milliseconds(10)) }
            }
            let accounts = try Self.waitForBankAccounts(configuration: configuration, timeout: 120)
            let counter = try String(contentsOfFile: home.path.appending("bank-counter.txt").string, encoding: .utf8)
                .split(separator: "\n").first.flatMap { UInt64($0, radix: 16) }.map(GlobalAddress.init(rawValue:))
            let engine = engine
            var random = SystemRandomNumberGenerator()
            var refused: (any Error)?
            var moved = 0
            for index in 0..<bankTransfers {
                if let bankStopFile, FileManager.default.fileExists(atPath: bankStopFile) { break }
                if terminationRequested.load(ordering: .relaxed) { break }
                let from = accounts.randomElement(using: &random)!
                var to = accounts.randomElement(using: &random)!
                while to == from { to = accounts.randomElement(using: &random)! }
                let amount = Int64.random(in: 1...50, using: &random)
                do {
                    let didMove = try engine.run { tx -> Bool in
                        let a = try tx.read(from, as: Int64.self)
                        let b = try tx.read(to, as: Int64.self)
                        guard a >= amount else { return false }
                        try tx.write(from, a - amount)
                        try tx.write(to, b + amount)
                        if let counter { try tx.write(counter, try tx.read(counter, as: Int64.self) + 1) }
                        return true
                    }
                    if didMove { moved += 1 }
                    if bankReportEvery > 0, (index + 1) % bankReportEvery == 0 {
                        let balances = try engine.run { tx in try accounts.map { try tx.read($0, as: Int64.self) } }
                        print("acked \(moved)")
                        print("audit \(balances.reduce(0, +)) \(balances.min() ?? 0)")
                        fflush(nil)
                    }
                } catch {
                    refused = error
                    break
                }
                if bankPauseMicroseconds > 0 { usleep(bankPauseMicroseconds) }
            }
            if let refused {
                // E.g. removed from the configuration: the members refuse this node's records. It
                // stops transferring but stays up (membership events still follow).
                print("transfer-refused \(refused)")
            } else {
                try engine.flushTruncations()
                print(bankReportEvery > 0 ? "done \(moved)" : "done \(bankTransfers)")
            }
            fflush(nil)
        }
        while true {
            if terminationRequested.load(ordering: .acquiring) {
                // SIGTERM or SIGINT: leave the configuration (the CM removes this node at once, no
                // suspicion) once the commits in flight have ended, then exit 0. A node without a
                // configuration manager flushes what it owes and stops.
                // `granary cluster down` stops the whole cluster: it leaves a `stopping` file beside
                // the pid file first, and then nobody leaves (the last members could not: no
                // configuration manager would remain to remove them).
                let wholeClusterStops = pidFile.map {
                    FileManager.default.fileExists(atPath: URL(fileURLWithPath: $0).deletingLastPathComponent().appendingPathComponent(ClusterDown.stoppingFile).path)
                } ?? false
                if let membership, !wholeClusterStops {
                    let left = try await membership.leave()
                    print("left \(left.id.rawValue)")
                    await membership.stop()
                    await events?.value
                } else if let membership {
                    try? engine.flushTruncations()
                    await membership.stop()
                    await events?.value
                    print("stopped")
                } else {
                    try? engine.flushTruncations()
                }
                engine.stop()
                storage.spares.stop()
                fflush(nil)
                Foundation.exit(0)
            }
            if rejoin, let membership, membership.mustRejoin, !membership.isLeaving { break }
            try await Task.sleep(for: .milliseconds(10))
        }
        guard let membership else { return }
        // Removed: this process starts again as a new one (what it held is superseded) and
        // rejoins from the configuration the store holds.
        await membership.stop()
        await events?.value
        engine.stop()
        storage.spares.stop()
        print("rejoining")
        fflush(nil)
        setenv("GRANARY_REJOIN_EXEC", "\(engine.configuration.id.rawValue)", 1)
        var arguments = CommandLine.arguments.map { strdup($0) }
        arguments.append(nil)
        execv("/proc/self/exe", &arguments)
        throw CommandFailure("\(node) could not start again to rejoin: execv failed (errno \(errno))")
    }

    /// The capacity of each ring of a node process's mailbox, in bytes.
    static let ringCapacity = 256 << 10

    /// The bank accounts every member holding regions published, once all of them have.
    static func waitForBankAccounts(configuration: Configuration, timeout: Double) throws -> [GlobalAddress] {
        let owners = configuration.members.filter { member in configuration.regions.contains { $0.primary == member.node } }
        let deadline = Date().addingTimeInterval(timeout)
        var accounts: [GlobalAddress] = []
        for member in owners {
            let path = try NodeStorage.directory(of: member).path.appending("bank-accounts.txt").string
            while !FileManager.default.fileExists(atPath: path) {
                guard Date() < deadline else { throw CommandFailure("\(member.node) published no bank accounts within \(timeout) s") }
                usleep(20_000)
            }
            let text = try String(contentsOfFile: path, encoding: .utf8)
            accounts += text.split(separator: "\n").compactMap { UInt64($0, radix: 16).map(GlobalAddress.init(rawValue:)) }
        }
        return accounts
    }
}
