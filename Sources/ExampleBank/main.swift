// An embedded Granary cluster in one process: three nodes, every region on three replicas.
// Opens accounts, moves money between them from every node at once, and audits the total.
//
//   swift run example-bank
import Granary

let cluster = try await Cluster.local(nodes: 3, replicas: 3)
print("cluster: \(cluster.configuration.members.count) nodes, \(cluster.configuration.regions.count) regions, files in \(cluster.directory)")

// Each node opens ten accounts of 100 in its own regions.
var accounts: [GlobalAddress] = []
for node in cluster.nodes {
    accounts += try await node.transaction { tx in try (0..<10).map { _ in try tx.allocate(Int64(100)) } }
}
let all = accounts

// 300 transfers from each node, concurrently; conflicts retry automatically.
try await withThrowingTaskGroup(of: Void.self) { group in
    for node in cluster.nodes {
        group.addTask {
            for i in 0..<300 {
                let from = all[(i * 7 + node.id.index) % all.count], to = all[(i * 11 + 3) % all.count]
                guard from != to else { continue }
                try await node.transaction { tx in
                    let balance = try tx.read(from, as: Int64.self)
                    guard balance >= 5 else { return }
                    try tx.write(from, balance - 5)
                    try tx.write(to, try tx.read(to, as: Int64.self) + 5)
                }
            }
        }
    }
    try await group.waitForAll()
}

// A read-only audit: strictly serializable, so the total is exactly what was deposited.
let total = try await cluster.nodes[1].transaction { tx in try all.map { try tx.read($0, as: Int64.self) }.reduce(0, +) }
let stats = cluster.nodes.map(\.statistics)
print("total \(total) (expected \(100 * all.count)); committed \(stats.map(\.committed).reduce(0, +)), aborted attempts \(stats.map(\.totalAborts).reduce(0, +))")
try await cluster.shutdown()
