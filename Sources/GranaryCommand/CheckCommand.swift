import ArgumentParser
import Foundation
import Granary
import GranaryEngine
import GranaryCheck
import GranaryWorkloads
import Synchronization

/// `granary check`: the strict-serializability checker. `granary check FILE` checks a history
/// file (the default subcommand, `history`).
struct CheckCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Check a transaction history for strict serializability (an Elle-like checker).",
        discussion: """
            A history is JSON Lines, one operation per line: {"index": 7, "process": 2, \
            "type": "invoke"|"ok"|"fail"|"info", "f": "txn", "value": [["append", 5, 12], \
            ["r", 7, null]], "time": 123456789}; "process": "nemesis" marks fault events. \
            `granary check FILE` prints the anomalies found with their cycles and exits 1 if there \
            are any, 2 if the file cannot be read or is malformed. `granary check run` runs a \
            workload and faults on an embedded cluster, writes its history and checks it.
            """,
        subcommands: [
            CheckHistoryCommand.self,
            GenerateHistoryCommand.self,
            CheckRunCommand.self,
            CheckServeCommand.self,
        ],
        defaultSubcommand: CheckHistoryCommand.self
    )
}

/// `granary check history FILE` (the default: `granary check FILE`).
struct CheckHistoryCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "history",
        abstract: "Check a history file; exit 1 if it has anomalies, 2 if it is unreadable or malformed.")

    @Argument(help: "The history file (JSON Lines).") var file: String
    @Flag(help: "Print the report as JSON.") var json = false
    @Option(help: "Examples shown per anomaly class (all are counted).") var maxExamples: Int = 5
    @Flag(help: "Print how long reading and checking took, to standard error.") var timing = false

    func validate() throws {
        guard maxExamples >= 0 else { throw ValidationError("--max-examples must be at least 0") }
    }

    func run() throws {
        let clock = ContinuousClock()
        let start = clock.now
        let history: History
        do {
            history = try History.load(path: file)
        } catch {
            FileHandle.standardError.write(Data("granary check: \(error)\n".utf8))
            throw ExitCode(2)
        }
        let parsed = clock.now
        let report = GranaryCheck.check(history: history, options: CheckOptions(maxExamples: maxExamples))
        let checked = clock.now
        print(json ? report.json() : report.description)
        if timing {
            FileHandle.standardError.write(Data("granary check: read and parsed \(history.operations.count) operations in \(parsed - start), checked \(history.transactions.count) transactions in \(checked - parsed)\n".utf8))
        }
        if !report.isValid { throw ExitCode(1) }
    }
}

/// `granary check generate` (hidden): writes a valid, generated list-append history, to time
/// and try the checker on.
struct GenerateHistoryCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "generate",
        abstract: "Write a generated, strictly serializable list-append history (for timing the checker).",
        shouldDisplay: false)

    @Option(help: "The file to write.") var output: String
    @Option(help: "Transactions.") var transactions: Int = 100_000
    @Option(help: "Client processes.") var processes: Int = 10
    @Option(help: "Keys.") var keys: Int = 100
    @Option(help: "Nemesis events.") var nemesisEvents: Int = 4
    @Option(help: "Random seed.") var seed: UInt64 = 1

    func validate() throws {
        guard transactions >= 0, processes >= 1, keys >= 1, nemesisEvents >= 0 else {
            throw ValidationError("--transactions and --nemesis-events must be at least 0, --processes and --keys at least 1")
        }
    }

    func run() throws {
        let generator = HistoryGenerator(.init(transactions: transactions, processes: processes, keys: keys,
                                               nemesisEvents: nemesisEvents, seed: seed))
        let operations = generator.listAppend()
        let history = try History(operations: operations)
        do {
            try history.jsonLines().write(to: URL(fileURLWithPath: output))
        } catch {
            FileHandle.standardError.write(Data("granary check generate: cannot write \(output): \(error.localizedDescription)\n".utf8))
            throw ExitCode(2)
        }
        print("wrote \(operations.count) operations (\(history.transactions.count) transactions) to \(output)")
    }
}

/// The options `granary check run` and its cluster process (`granary check serve`) share.
struct CheckWorkloadOptions: ParsableArguments {
    @Option(help: "The workload: list-append or rw-register.") var workload: String = CheckWorkload.listAppend.rawValue
    @Option(help: "Client threads (client c runs on node c mod --nodes).") var clients: Int = 6
    @Option(help: "Keys in use at a time (few: conflicts are frequent).") var keys: Int = 8
    @Option(help: "Nodes in the embedded cluster.") var nodes: Int = 3
    @Option(help: "Replicas of every region.") var replicas: Int = 3
    @Option(help: "Seconds between in-process fault windows (each lasts half of it).") var faultInterval: Double = 1
    @Option(help: "Failure probability of each send or read in a `faults` window.") var faultProbability: Double = 0.02
    @Option(name: .customLong("break"),
            help: "Break the commit protocol on purpose, to see the checker catch it: skip-validate or skip-lock-check.")
    var sabotage: String?
    @Option(help: "Random seed.") var seed: UInt64 = 1

    func validate() throws {
        guard CheckWorkload(rawValue: workload) != nil else { throw ValidationError("--workload is list-append or rw-register, not \(workload)") }
        guard clients >= 1, clients <= 64 else { throw ValidationError("--clients is 1 to 64") }
        guard keys >= 1 else { throw ValidationError("--keys is at least 1") }
        guard nodes >= 1, nodes <= 8, replicas >= 1, replicas <= nodes else { throw ValidationError("--nodes is 1 to 8, --replicas 1 to --nodes") }
        guard faultInterval > 0, faultProbability >= 0, faultProbability <= 1 else {
            throw ValidationError("--fault-interval is positive, --fault-probability 0 to 1")
        }
        if let sabotage, ProtocolSabotage(rawValue: sabotage) == nil {
            throw ValidationError("--break is skip-validate or skip-lock-check, not \(sabotage)")
        }
    }

    func runOptions(seconds: Double, faults: Set<CheckFault>) -> CheckRunOptions {
        var options = CheckRunOptions()
        options.workload = CheckWorkload(rawValue: workload)!
        options.clients = clients
        options.activeKeys = keys
        options.nodes = nodes
        options.replicas = replicas
        options.seconds = seconds
        options.faults = faults
        options.faultInterval = faultInterval
        options.faultProbability = faultProbability
        options.sabotage = sabotage.flatMap(ProtocolSabotage.init(rawValue:))
        options.seed = seed
        return options
    }
}

/// Monotonic nanoseconds, the clock the history writer stamps operations with.
private func historyNow() -> Int { Int(truncatingIfNeeded: DispatchTime.now().uptimeNanoseconds) }

/// `granary check run`: a workload and faults on an embedded cluster; the history is written and
/// checked, and the command exits 1 if it has anomalies.
struct CheckRunCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Run a workload with faults on an embedded cluster, or as a client of node processes (--cluster), write its history and check it.",
        discussion: """
            Faults (--nemesis, comma-separated): faults (one node's sends and reads fail now and \
            then, for a window), slow (one node's sends and record processing are delayed, for a \
            window), kill (the process running the cluster is SIGKILLed every --kill-interval \
            seconds and the cluster reopened from its region files, with restart recovery; with \
            --cluster every node process and the client are SIGKILLed and the nodes started again \
            with `granary cluster up`), pause \
            (that process is stopped with SIGSTOP for 0.1-0.5 s, then continued, about once a \
            second; with --cluster one node process), crash (one node crashes every --fault-interval \
            seconds, as SIGKILL would, up to replicas - 1 of them; the configuration manager runs \
            and the survivors recover). With kill (or pause of an embedded cluster), each life of \
            the cluster, or of the client with --cluster, is a `granary check serve` child. Exit \
            status: 0 if the history \
            has no anomaly, 1 if it has, 2 if the run itself failed.
            """)

    @OptionGroup var workload: CheckWorkloadOptions
    @Option(help: "Seconds of workload in all.") var seconds: Double = 10
    @Option(help: "Faults: faults, slow, kill, pause, crash (comma-separated).") var nemesis: String = ""
    @Option(help: "Seconds between whole-cluster kills (with --nemesis kill).") var killInterval: Double = 3
    @Option(help: "Run the clients against the node processes of this cluster file (granary cluster up) as one of its clients (granary cluster init --clients), instead of an embedded cluster. Faults: kill (every node process and the client SIGKILLed at once, the nodes restarted with `granary cluster up`), pause (a node process SIGSTOPped for 0.1-0.5 s, then continued), faults and slow (on the client).")
    var cluster: String?
    @Option(help: "With --cluster: its nodes run the configuration manager through this ZooKeeper (zookeeper://host:port, as given to `granary cluster up --coordination`; default: the cluster file's \"coordination\"). The client joins the configuration and follows it; kill then SIGKILLs one node process at a time and starts it again (it rejoins), and pause stops one past its lease (it is removed and rejoins). Each fault waits until every node is a member again with complete replicas.")
    var coordination: String?
    @Option(help: "The cluster directory (default: a new directory under the temporary directory).") var directory: String?
    @Option(help: "The history file (default: history.jsonl in the cluster directory).") var history: String?
    @Flag(help: "Print the report as JSON.") var json = false

    var faults: Set<CheckFault> {
        Set(nemesis.split(separator: ",").compactMap { CheckFault(rawValue: String($0.trimmingCharacters(in: .whitespaces))) })
    }

    func validate() throws {
        for name in nemesis.split(separator: ",") where CheckFault(rawValue: String(name.trimmingCharacters(in: .whitespaces))) == nil {
            throw ValidationError("--nemesis takes faults, slow, kill, pause and crash, not \(name)")
        }
        guard seconds > 0, killInterval > 0 else { throw ValidationError("--seconds and --kill-interval are positive") }
        if cluster != nil {
            guard !faults.contains(.crash) else {
                throw ValidationError("--nemesis crash acts on an embedded cluster; with --cluster: kill, pause, faults, slow")
            }
            if let sabotage = workload.sabotage, sabotage != ProtocolSabotage.skipValidation.rawValue {
                throw ValidationError("--break \(sabotage) breaks the primaries, which run in the node processes; with --cluster: skip-validate")
            }
        }
        if let coordination {
            guard cluster != nil else { throw ValidationError("--coordination goes with --cluster (an embedded cluster's coordination store is in the process)") }
            guard case .zookeeper? = CoordinationChoice(coordination) else {
                throw ValidationError("--coordination takes zookeeper://host:port, got '\(coordination)'")
            }
        }
        if faults.contains(.crash), !faults.isDisjoint(with: [.kill, .pause]) {
            // A reopened cluster starts from cluster.json, which still lists the crashed nodes.
            throw ValidationError("--nemesis crash runs the cluster in this process: it does not combine with kill or pause")
        }
    }

    func run() async throws {
        let directory = self.directory ?? (NSTemporaryDirectory() + "granary-check-" + String(UInt64.random(in: 0...UInt64.max), radix: 36))
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let historyPath = history ?? directory + "/history.jsonl"
        let faults = self.faults
        let summary: CheckRunSummary
        do {
            // The coordination store: --coordination, else the one the cluster file names.
            let coordination = try self.coordination ?? cluster.flatMap { try ClusterFile.load($0).coordination }
            if let cluster, faults.contains(.kill), coordination == nil {
                summary = try runLives(directory: directory, historyPath: historyPath, faults: faults, clusterFile: cluster)
            } else if let cluster {
                summary = try await runAgainstNodes(file: cluster, coordination: coordination, historyPath: historyPath, faults: faults)
            } else if !faults.isDisjoint(with: [.kill, .pause]) {
                summary = try runLives(directory: directory, historyPath: historyPath, faults: faults, clusterFile: nil)
            } else {
                summary = try await runInProcess(directory: directory, historyPath: historyPath, faults: faults)
            }
        } catch {
            FileHandle.standardError.write(Data("granary check run: \(error)\n".utf8))
            throw ExitCode(2)
        }
        let history: History
        do {
            history = try History.load(path: historyPath)
        } catch {
            FileHandle.standardError.write(Data("granary check run: the history \(historyPath) does not parse: \(error)\n".utf8))
            throw ExitCode(2)
        }
        let report = GranaryCheck.check(history: history)
        if json {
            print(report.json())
        } else {
            let anomalies = report.anomalyKinds.map { "\($0.rawValue) \(report.anomalyCounts[$0] ?? 0)" }.joined(separator: ", ")
            print("""
                check run: \(workload.workload), \(workload.clients) clients, \(cluster.map { "the node processes of \($0)" } ?? "\(workload.nodes) nodes, \(workload.replicas) replicas"), \
                \(seconds) s, nemesis \(nemesis.isEmpty ? "none" : nemesis)\(workload.sabotage.map { ", protocol broken: \($0)" } ?? "")
                  transactions  \(report.okCount) ok, \(report.failCount) fail, \(report.infoCount) info (\(report.observedInfoCount) of them seen committed)\(summary.firstFailure.map { "; first failure: \($0)" } ?? "")
                  faults        \(summary.faults) (\(report.nemesisCount) nemesis events in the history)
                  anomalies     \(anomalies.isEmpty ? "none" : anomalies)
                  history       \(historyPath)
                """)
            if !report.isValid { print(report.description) }
        }
        if !report.isValid { throw ExitCode(1) }
    }

    /// Without `kill`: the cluster runs in this process.
    private func runInProcess(directory: String, historyPath: String, faults: Set<CheckFault>) async throws -> CheckRunSummary {
        var options = workload.runOptions(seconds: seconds, faults: faults)
        options.flushInvokes = false
        let cluster = try await Cluster.local(nodes: options.nodes, replicas: options.replicas, directory: .init(directory), options: options.clusterOptions)
        let keys = try await CheckKeys.prepare(cluster, directory: directory, options: options)
        let writer = try HistoryWriter(path: historyPath)
        let summary = await CheckRunner.run(cluster, keys: keys, options: options, history: writer)
        try writer.close()
        try await cluster.shutdown()
        return summary
    }

    /// With `--cluster`: the clients run in this process as a client member of the cluster file's
    /// node processes; `pause` stops one node process at a time (its pid from `n<id>.pid` beside
    /// the file), logged in the history. With `--coordination`, the faults of
    /// ``CoordinatedNemesis``.
    private func runAgainstNodes(file: String, coordination: String?, historyPath: String, faults: Set<CheckFault>) async throws -> CheckRunSummary {
        let options = workload.runOptions(seconds: seconds, faults: faults)
        let nodes = try runningNodes(file: file)
        var clusterOptions = options.clusterOptions
        if let coordination, let choice = CoordinationChoice(coordination) {
            clusterOptions.coordination = choice
            clusterOptions.membership = MembershipOptions()
        }
        let cluster = try await Cluster.connect(file: FilePath(file), options: clusterOptions)
        let keys = try await CheckKeys.prepare(cluster, directory: nil, options: options)
        let writer = try HistoryWriter(path: historyPath)
        let done = Atomic<Bool>(false)
        let paused = Atomic<Int>(0)
        let coordinated = coordination.map {
            CoordinatedNemesis(file: file, coordination: $0, nodes: nodes.map(\.node), faults: faults.intersection([.kill, .pause]),
                               interval: killInterval, seed: options.seed, client: cluster.nodes[0].engine, history: writer)
        }
        let nemesis = Thread { [options] in
            if let coordinated { return coordinated.run { done.load(ordering: .acquiring) } }
            guard faults.contains(.pause) else { return }
            var random = WorkloadRandom(seed: options.seed &+ 0x9A05E)
            while !done.load(ordering: .acquiring) {
                usleep(UInt32(random.uniform(500_000...1_500_000)))
                if done.load(ordering: .acquiring) { break }
                let index = random.uniform(0...(nodes.count - 1))
                let length = random.uniform(100...500)
                writer.nemesis("pause", value: .int(nodes[index].node))
                kill(nodes[index].pid, SIGSTOP)
                usleep(UInt32(length * 1_000))
                kill(nodes[index].pid, SIGCONT)
                writer.nemesis("resume", value: .int(nodes[index].node))
                paused.add(1, ordering: .relaxed)
            }
        }
        nemesis.start()
        var summary = await CheckRunner.run(cluster, keys: keys, options: options, history: writer)
        done.store(true, ordering: .releasing)
        while !nemesis.isFinished { try await Task.sleep(for: .milliseconds(5)) }
        summary.faults += paused.load(ordering: .relaxed)
        if let coordinated {
            summary.faults += coordinated.injected
            // The cluster is left as the run found it: every node a member, every replica complete.
            if let failure = coordinated.failure ?? coordinated.settle(timeout: .seconds(60)) {
                try writer.close()
                throw CheckRunError(failure)
            }
        }
        try writer.close()
        try await cluster.shutdown()
        return summary
    }

    /// With `kill`: each life of the cluster is a `granary check serve` child, SIGKILLed after
    /// `--kill-interval` seconds (the last one runs to the end); its history segment is appended
    /// to the history, its invocations left without completion marked `info` (outcome unknown).
    ///
    /// With `clusterFile` (node processes): the child is a client of the file's node processes,
    /// and a kill is SIGKILL of every node process and of the client at once; the next life
    /// starts the nodes again with `granary cluster up` (restart recovery over every node's log),
    /// and its client reconnects. `pause` stops one node process at a time.
    private func runLives(directory: String, historyPath: String, faults: Set<CheckFault>, clusterFile: String?) throws -> CheckRunSummary {
        guard FileManager.default.createFile(atPath: historyPath, contents: nil),
              let output = FileHandle(forWritingAtPath: historyPath) else {
            throw CheckRunError("cannot create the history \(historyPath)")
        }
        defer { try? output.close() }
        var nextIndex = 0
        var summary = CheckRunSummary()
        func append(_ operation: HistoryOperation) throws {
            var operation = operation
            operation.index = nextIndex
            nextIndex += 1
            try output.write(contentsOf: Data((operation.jsonLine + "\n").utf8))
        }
        let executable = CommandLine.arguments[0].hasPrefix("/") ? CommandLine.arguments[0]
            : FileManager.default.currentDirectoryPath + "/" + CommandLine.arguments[0]
        let end = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
        var life = 0
        var lastLifeKilled = false
        while ContinuousClock.now < end {
            let remaining = Double((end - ContinuousClock.now).components.seconds) + Double((end - ContinuousClock.now).components.attoseconds) / 1e18
            let segment = directory + "/segment-\(life).jsonl"
            var nodePids: [(node: Int, pid: pid_t)] = []
            if let clusterFile {
                if life > 0 { try clusterUp(executable: executable, file: clusterFile) }
                nodePids = try runningNodes(file: clusterFile)
            }
            let child = Process()
            child.executableURL = URL(fileURLWithPath: executable)
            var arguments = ["check", "serve", "--directory", directory, "--segment", segment,
                             "--seconds", String(remaining), "--life", String(life),
                             "--workload", workload.workload, "--clients", String(workload.clients), "--keys", String(workload.keys),
                             "--nodes", String(workload.nodes), "--replicas", String(workload.replicas),
                             "--fault-interval", String(workload.faultInterval), "--fault-probability", String(workload.faultProbability),
                             "--seed", String(workload.seed &+ UInt64(life))]
            let inProcess = faults.subtracting([.kill, .pause]).map(\.rawValue).sorted()
            if !inProcess.isEmpty { arguments += ["--nemesis", inProcess.joined(separator: ",")] }
            if let sabotage = workload.sabotage { arguments += ["--break", sabotage] }
            if let clusterFile { arguments += ["--cluster", clusterFile] }
            child.arguments = arguments
            let pipe = Pipe()
            child.standardOutput = pipe
            try child.run()
            // Wait for the cluster to be open (restart recovery done), then let it run; a cluster
            // that does not open within a minute is killed (and the run fails, saying so).
            let opened = Atomic<Bool>(false)
            let pid = child.processIdentifier
            DispatchQueue.global().asyncAfter(deadline: .now() + 60) { if !opened.load(ordering: .acquiring) { kill(pid, SIGKILL) } }
            let ready = pipe.fileHandleForReading
            var line = Data()
            while !line.contains(0x0A) {
                let chunk = ready.availableData
                if chunk.isEmpty { break }
                line.append(chunk)
            }
            opened.store(true, ordering: .releasing)
            guard String(decoding: line, as: UTF8.self).hasPrefix("ready") else {
                child.waitUntilExit()
                throw CheckRunError("the cluster process of life \(life) did not start (status \(child.terminationStatus)): \(String(decoding: line, as: UTF8.self))")
            }
            if life > 0 { try append(.nemesis(index: 0, f: "reopen", value: .int(life), time: historyNow())) }
            let lifeEnd = faults.contains(.kill)
                ? min(end, ContinuousClock.now + .milliseconds(Int(killInterval * 1000 * Double.random(in: 0.5...1.5)))) : end
            // Pauses (SIGSTOP, then SIGCONT) while the life lasts; merged into the history by time.
            var events: [HistoryOperation] = []
            var nextPause = ContinuousClock.now + .milliseconds(Int.random(in: 500...1500))
            while ContinuousClock.now < lifeEnd, child.isRunning {
                if faults.contains(.pause), ContinuousClock.now >= nextPause {
                    let length = Int.random(in: 100...500)
                    // Node processes: one of them, named in the event; else the cluster's process.
                    let target = nodePids.randomElement()
                    let value = JSONValue.int(target?.node ?? length)
                    events.append(.nemesis(index: 0, f: "pause", value: value, time: historyNow()))
                    kill(target?.pid ?? child.processIdentifier, SIGSTOP)
                    usleep(UInt32(length) * 1000)
                    kill(target?.pid ?? child.processIdentifier, SIGCONT)
                    events.append(.nemesis(index: 0, f: "resume", value: value, time: historyNow()))
                    summary.faults += 1
                    nextPause = ContinuousClock.now + .milliseconds(Int.random(in: 500...1500))
                }
                usleep(10_000)
            }
            var killedAt: Int?
            if faults.contains(.kill), child.isRunning && ContinuousClock.now < end {
                // The whole cluster at once: every node process, then the client.
                for (_, pid) in nodePids { kill(pid, SIGKILL) }
                kill(child.processIdentifier, SIGKILL)
                killedAt = historyNow()
                summary.faults += 1
            }
            child.waitUntilExit()
            if killedAt != nil {
                // The node processes are not this process's children: wait until they are gone.
                let deadline = ContinuousClock.now + .seconds(10)
                while nodePids.contains(where: { ClusterDown.isAlive($0.pid) }) {
                    guard ContinuousClock.now < deadline else { throw CheckRunError("the node processes of \(clusterFile ?? "") do not exit after SIGKILL") }
                    usleep(5_000)
                }
            }
            if killedAt == nil && child.terminationStatus != 0 {
                throw CheckRunError("the cluster process of life \(life) exited with status \(child.terminationStatus)")
            }
            // The segment: every whole line (a kill can cut the last one short).
            let data = (try? Data(contentsOf: URL(fileURLWithPath: segment))) ?? Data()
            let whole = data.lastIndex(of: 0x0A).map { data[...$0] } ?? Data()
            let operations = try History.parse(Data(whole), file: segment).operations
            if let killedAt { events.append(.nemesis(index: 0, f: "kill-cluster", value: .int(life), time: killedAt)) }
            var pending: [Int: HistoryOperation] = [:]
            var nextEvent = 0
            for operation in operations {
                while nextEvent < events.count, events[nextEvent].time <= operation.time {
                    try append(events[nextEvent])
                    nextEvent += 1
                }
                try append(operation)
                guard case .client(let process) = operation.process else { continue }
                if operation.type == .invoke { pending[process] = operation } else { pending[process] = nil }
                switch operation.type {
                case .ok: summary.ok += 1
                case .fail: summary.failed += 1
                case .info: summary.unknown += 1
                case .invoke: break
                }
            }
            for event in events[nextEvent...] { try append(event) }
            let cut = killedAt ?? historyNow()
            for (process, invoke) in pending.sorted(by: { $0.key < $1.key }) {
                try append(HistoryOperation(index: 0, process: .client(process), type: .info, f: invoke.f, value: invoke.value, time: max(cut, invoke.time)))
                summary.unknown += 1
            }
            summary.faults += operations.filter { if case .nemesis = $0.process { $0.f.hasPrefix("start-") } else { false } }.count
            life += 1
            lastLifeKilled = killedAt != nil
        }
        if let clusterFile, lastLifeKilled {
            // The run ended right after a kill: the node processes are started again, as the
            // cluster was before the run (restart recovery included).
            try clusterUp(executable: executable, file: clusterFile)
            try append(.nemesis(index: 0, f: "reopen", value: .int(life), time: historyNow()))
        }
        return summary
    }

    /// `granary cluster up` over the directory of `file`, whose node processes were all killed:
    /// restart recovery over every node's log, then the nodes start.
    private func clusterUp(executable: String, file: String) throws {
        let up = Process()
        up.executableURL = URL(fileURLWithPath: executable)
        up.arguments = ["cluster", "up", "--directory", URL(fileURLWithPath: file).deletingLastPathComponent().path]
        let output = Pipe()
        up.standardOutput = output
        up.standardError = output
        try up.run()
        let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        up.waitUntilExit()
        guard up.terminationStatus == 0 else {
            throw CheckRunError("granary cluster up after a kill failed (status \(up.terminationStatus)): \(text)")
        }
    }

    /// The node processes (not clients) of the cluster file, from their pid files.
    private func runningNodes(file: String) throws -> [(node: Int, pid: pid_t)] {
        let configuration = try JSONDecoder().decode(Configuration.self, from: Data(contentsOf: URL(fileURLWithPath: file)))
        let directory = URL(fileURLWithPath: file).deletingLastPathComponent().path
        return try configuration.servers.map { node in
            guard let pid = ClusterDown.runningPid(directory: directory, node: node.index) else {
                let path = "\(directory)/\(node).pid"
                let recorded = (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
                let state = recorded.flatMap { pid_t($0) }.flatMap { ClusterDown.processStat($0) }
                    .map { $0.split(separator: " ").prefix(3).joined(separator: " ") }
                throw CheckRunError("\(node) of \(file) does not run (\(path): \(recorded.map { "process \($0), \(state ?? "no such process")" } ?? "none")): start the cluster with `granary cluster up`")
            }
            return (node.index, pid)
        }
    }
}

/// `granary check serve` (hidden): one life of `granary check run --nemesis kill`'s cluster:
/// opens (or reopens, with restart recovery) the cluster, prints `ready`, runs the clients for
/// `--seconds` writing the history segment, and exits, unless it is killed first.
struct CheckServeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve", abstract: "Run one life of a check run's cluster (for granary check run).", shouldDisplay: false)

    @OptionGroup var workload: CheckWorkloadOptions
    @Option var directory: String
    @Option var segment: String
    @Option var seconds: Double
    @Option var life: Int
    @Option var nemesis: String = ""
    @Option var cluster: String?

    func run() async throws {
        // Die with the `granary check run` that started this (a killed parent leaves no cluster behind).
        let parent = getppid()
        Thread {
            while getppid() == parent { usleep(100_000) }
            Foundation.exit(3)
        }.start()
        var options = workload.runOptions(seconds: seconds,
                                          faults: Set(nemesis.split(separator: ",").compactMap { CheckFault(rawValue: String($0)) }))
        options.processBase = life * options.clients
        options.valueBase = life << 32
        options.flushInvokes = true
        // A client of node processes (check run --cluster --nemesis kill), or the embedded cluster.
        let cluster: Cluster
        if let file = self.cluster {
            cluster = try await Cluster.connect(file: FilePath(file), options: options.clusterOptions)
        } else {
            cluster = try await Cluster.local(nodes: options.nodes, replicas: options.replicas, directory: .init(directory), options: options.clusterOptions)
        }
        let keys = try await CheckKeys.prepare(cluster, directory: directory, options: options)
        let writer = try HistoryWriter(path: segment)
        print("ready")
        fflush(nil)
        _ = await CheckRunner.run(cluster, keys: keys, options: options, history: writer)
        try writer.close()
        try await cluster.shutdown()
    }
}

/// `granary check run --cluster FILE --coordination zookeeper://...`'s faults on node processes
/// that run the configuration manager: `kill` SIGKILLs one node process (the CM among the
/// candidates) and starts it again after 0.2-1 s, with the arguments `cluster up` gives it (it
/// waits for its removal, rejoins and gets its replicas copied back); `pause` stops one with
/// SIGSTOP for 0.1-0.5 s, past its lease (it is removed, and rejoins once continued). Before each
/// fault it waits until the cluster is whole again (every node a member, no replica still
/// copying), so that a region never loses its last complete replica. Every fault is a nemesis
/// line in the history.
final class CoordinatedNemesis: Sendable {
    let file: String
    let directory: String
    let coordination: String
    let nodes: [Int]
    let faults: Set<CheckFault>
    let interval: Double
    let seed: UInt64
    let client: Engine
    let history: HistoryWriter
    private let state = Mutex<(injected: Int, failure: String?)>((0, nil))

    init(file: String, coordination: String, nodes: [Int], faults: Set<CheckFault>, interval: Double, seed: UInt64,
         client: Engine, history: HistoryWriter) {
        self.file = file
        self.directory = URL(fileURLWithPath: file).deletingLastPathComponent().path
        self.coordination = coordination
        self.nodes = nodes
        self.faults = faults
        self.interval = interval
        self.seed = seed
        self.client = client
        self.history = history
    }

    /// Faults injected so far.
    var injected: Int { state.withLock { $0.injected } }
    /// Why the faults stopped early (the cluster did not become whole again, a node could not be
    /// started), if they did.
    var failure: String? { state.withLock { $0.failure } }

    /// Whether the configuration the client follows lists every node and every region has all
    /// its replicas, none still copying.
    var isWhole: Bool {
        let configuration = client.configuration
        let replication = ConfigurationRecord.replication(of: configuration)
        return Set(configuration.servers.map(\.index)) == Set(nodes)
            && configuration.regions.allSatisfy { $0.copying.isEmpty && $0.replicas.count == replication }
            && nodes.allSatisfy { ClusterDown.runningPid(directory: directory, node: $0) != nil }
    }

    /// The size of node `node`'s log now (where what it prints next begins).
    func logOffset(_ node: Int) -> UInt64 {
        ((try? FileManager.default.attributesOfItem(atPath: directory + "/n\(node).log"))?[.size] as? UInt64) ?? 0
    }

    /// What node `node` printed after `offset`, by lines.
    func logLines(_ node: Int, after offset: UInt64) -> [Substring] {
        guard let handle = FileHandle(forReadingAtPath: directory + "/n\(node).log") else { return [] }
        defer { try? handle.close() }
        handle.seek(toFileOffset: offset)
        return String(decoding: handle.readDataToEndOfFile(), as: UTF8.self).split(separator: "\n")
    }

    /// After a fault of `node` whose effects its log shows after `offset`: the configuration that
    /// admitted it again (a restarted process, or one that was removed while stopped and rejoined),
    /// once it has printed `configuration ID`; nil while it has not. A node that was stopped and
    /// not removed (no `must-rejoin` within 2 s of its resume, `resumed`) needs no admission: 0.
    func readmission(of node: Int, after offset: UInt64, restarted: Bool, resumed: ContinuousClock.Instant) -> UInt64? {
        let lines = logLines(node, after: offset)
        var rejoining = restarted
        for line in lines {
            if line.hasPrefix("rejoining") { rejoining = true }
            if rejoining, line.hasPrefix("configuration "), let id = UInt64(line.dropFirst("configuration ".count)) { return id }
        }
        if !restarted, !lines.contains(where: { $0.hasPrefix("must-rejoin") || $0.hasPrefix("rejoining") }),
           ContinuousClock.now - resumed > .seconds(2) {
            return 0
        }
        return nil
    }

    /// The last fault: its node, where its log stood, whether it was restarted, when it ended.
    private let last = Mutex<(node: Int, offset: UInt64, restarted: Bool, at: ContinuousClock.Instant)?>(nil)

    /// Waits until the node of the last fault is admitted again (until then the configuration the
    /// client follows may still be the one from before the fault, which looks whole), then until
    /// the cluster ``isWhole`` in that configuration or a later one; the reason if not within
    /// `timeout`, nil also when `going` turns false.
    func settle(timeout: Duration, while going: () -> Bool = { true }) -> String? {
        var minimum: UInt64 = 0
        if let fault = last.withLock({ $0 }) {
            let deadline = ContinuousClock.now + timeout
            while true {
                if let id = readmission(of: fault.node, after: fault.offset, restarted: fault.restarted, resumed: fault.at) {
                    minimum = id
                    break
                }
                guard going() else { return nil }
                guard ContinuousClock.now < deadline else {
                    return "n\(fault.node) was not admitted again within \(timeout) of its fault (no `configuration` line in \(directory)/n\(fault.node).log after it)"
                }
                usleep(10_000)
            }
        }
        return waitUntilWhole(timeout: timeout, minimum: minimum, while: going)
    }

    /// Waits until ``isWhole`` in a configuration from `minimum` on; the reason if it is not
    /// within `timeout`.
    func waitUntilWhole(timeout: Duration, minimum: UInt64 = 0, while going: () -> Bool = { true }) -> String? {
        let deadline = ContinuousClock.now + timeout
        while client.configuration.id.rawValue < minimum || !isWhole {
            guard going() else { return nil }
            guard ContinuousClock.now < deadline else {
                return "the cluster of \(file) was not whole again (every node a member, every replica complete) within \(timeout) after the last fault: \(client.configuration)"
            }
            usleep(10_000)
        }
        return nil
    }

    func run(until stopped: () -> Bool) {
        guard !faults.isEmpty else { return }
        var random = WorkloadRandom(seed: seed &+ 0xC0DE)
        let kinds = faults.sorted { $0.rawValue < $1.rawValue }
        let executable = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path
        while !stopped() {
            let wait = ContinuousClock.now + .milliseconds(Int(interval * 1000 * Double(random.uniform(500...1500)) / 1000))
            while ContinuousClock.now < wait, !stopped() { usleep(10_000) }
            if let failure = settle(timeout: .seconds(60), while: { !stopped() }) {
                state.withLock { $0.failure = failure }
                return
            }
            if stopped() { return }
            let node = nodes[random.uniform(0...(nodes.count - 1))]
            guard let pid = ClusterDown.runningPid(directory: directory, node: node) else { continue }
            // The kinds take turns, so that a short run has each of them.
            switch kinds[injected % kinds.count] {
            case .kill:
                history.nemesis("kill-node", value: .int(node))
                kill(pid, SIGKILL)
                while ClusterDown.isAlive(pid) { usleep(1_000) }
                usleep(UInt32(random.uniform(200...1000)) * 1000)
                history.nemesis("restart-node", value: .int(node))
                last.withLock { $0 = (node, logOffset(node), true, ContinuousClock.now) }
                do {
                    try ClusterUp.launchNode(executable: executable, file: file, directory: directory, id: node,
                                             coordination: coordination, metricsPort: nil, appendingLog: true)
                } catch {
                    state.withLock { $0.failure = "n\(node) could not be started again: \(error)" }
                    return
                }
            default:
                let length = random.uniform(100...500)
                history.nemesis("pause", value: .int(node))
                let offset = logOffset(node)
                kill(pid, SIGSTOP)
                usleep(UInt32(length) * 1000)
                kill(pid, SIGCONT)
                history.nemesis("resume", value: .int(node))
                last.withLock { $0 = (node, offset, false, ContinuousClock.now) }
            }
            state.withLock { $0.injected += 1 }
        }
    }
}
